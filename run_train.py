r"""Train the self-attention music tagger.

    python run_train.py --config configs/mtat.py --workdir runs/mtat \
        --config.data_dir ~/tensorflow_datasets --config.global_batch_size 32

Any config field can be overridden with --config.FIELD=VALUE
(nested fields too: --config.model.dtype=bfloat16).
Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_bool(
    "distributed",
    None,
    "Call jax.distributed.initialize() (multi-host). Default: when JAX_COORDINATOR_ADDRESS is set.",
)
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file (e.g. configs/mtat.py, configs/mtat.py:readme).",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    import jax

    distributed = FLAGS.distributed
    if distributed is None:
        distributed = "JAX_COORDINATOR_ADDRESS" in os.environ
    if distributed:
        jax.distributed.initialize()

    from jaxtag import train

    train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))


if __name__ == "__main__":
    app.run(main)
