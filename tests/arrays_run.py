"""A tiny training run on in-memory arrays (no TensorFlow needed), as a module and a script.

    python tests/arrays_run.py WORKDIR [--epochs N] [--pause S] [--process I --processes P --port N]

Used by the kill/resume test (test_train_resume.py) and the two-process test
(test_multiprocess.py): `--pause` slows each batch so a test can kill the run mid-way;
`--processes 2` joins a `jax.distributed` run on 127.0.0.1 with CPU collectives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAGS = ["low", "mid", "high"]
FRAMES = 64


def tiny_config(epochs: int = 3):
    from configs.common import get_base_config

    config = get_base_config()
    config.dataset = "arrays"
    config.crop_frames = FRAMES
    config.model.update(
        conv_channels=1, width=16, num_layers=1, num_heads=2, ffn_size=32,
        positions_length=FRAMES + 1, num_tags=-1,
    )  # fmt: skip
    config.optimizer = "adamw_cosine"
    config.learning_rate = 3e-3
    config.global_batch_size = 8
    config.num_epochs = epochs
    config.steps_per_epoch = 10
    config.eval_batch_size = 8
    config.checkpoint_every_steps = 4
    config.log_every_steps = 1
    return config


def tiny_source(seed: int = 0):
    """Spectrograms whose tags say which third of the mel bands holds a loud stripe."""
    from jaxtag.sources import ArraySource

    rng = np.random.default_rng(seed)

    def examples(n: int, chunks: int | None) -> tuple[np.ndarray, np.ndarray]:
        tags = rng.integers(0, 2, (n, len(TAGS))).astype(np.float32)
        shape = (n, 96, FRAMES) if chunks is None else (n, chunks, 96, FRAMES)
        mel = rng.normal(-40, 5, shape).astype(np.float32)
        for i, tag_row in enumerate(tags):
            for t, on in enumerate(tag_row):
                if on:
                    mel[i, ..., 32 * t + 8 : 32 * t + 16, :] += 30
        return mel, tags

    return ArraySource(*examples(64, None), *examples(12, 2), TAGS)


class Paused:
    """A source whose training batches come `pause` seconds apart (a slow disk, for kill tests)."""

    def __init__(self, source, pause: float):
        self.source, self.pause = source, pause
        self.tags, self.num_train_examples = source.tags, source.num_train_examples

    def train_batches(self, global_batch_size, seed, start_step):
        for batch in self.source.train_batches(global_batch_size, seed, start_step):
            time.sleep(self.pause)
            yield batch

    def eval_batches(self, global_batch_size):
        return self.source.eval_batches(global_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--process", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process
        )
    from jaxtag import runtime, train

    runtime.enable_compilation_cache()
    source = tiny_source()
    if args.pause:
        source = Paused(source, args.pause)
    config = tiny_config(args.epochs)
    summary = train.train_and_evaluate(config, args.workdir, args.stop_after, source=source)
    state = train.checkpoint.load_model(args.workdir, prefer="latest")
    flat = jax.tree_util.tree_leaves(state.variables)
    print(
        json.dumps(
            {"summary_step": summary["step"], "checksum": float(sum(np.abs(x).sum() for x in flat))}
        )
    )


if __name__ == "__main__":
    main()
