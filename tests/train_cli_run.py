"""`jaxtag-train` itself (absl flags, error handling, exit codes) on tests/arrays_run.py's
in-memory data instead of a TFDS build, as a script and as its own config file:

    python tests/train_cli_run.py --config tests/train_cli_run.py --workdir W [--config.X=...]

JAXTAG_TEST_PAUSE=S slows each training batch by S seconds, so that a test can interrupt the run
mid-way (test_train_checks.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.arrays_run import Paused, tiny_config, tiny_source  # noqa: E402


def get_config():
    """The tiny run: one epoch of 4 steps, checkpoints every 2."""
    config = tiny_config(epochs=1)
    config.steps_per_epoch = 4
    config.checkpoint_every_steps = 2
    return config


def source(config):
    """Stands in for `jaxtag.sources.TfdsSource(config)`."""
    pause = float(os.environ.get("JAXTAG_TEST_PAUSE", "0"))
    return Paused(tiny_source(), pause) if pause else tiny_source()


if __name__ == "__main__":
    from jaxtag import train
    from jaxtag.cli.train import run

    train.TfdsSource = source
    run()
