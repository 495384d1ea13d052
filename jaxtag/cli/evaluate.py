r"""Evaluate a checkpoint on a dataset split: macro and per-tag ROC-AUC / PR-AUC.

    jaxtag-eval --checkpoint runs/mtat --data_dir ~/tensorflow_datasets \
        --dataset magnatagatune --split test

(also `python -m jaxtag.cli.evaluate`, or `python run_eval.py` from a clone.) --checkpoint takes a
training workdir (its best checkpoint by validation ROC-AUC), a step directory, or a converted
ponswon.pth checkpoint. The table is printed and the full report is written as JSON (default:
<checkpoint>/eval_<dataset>_<split>.json).
"""

from __future__ import annotations

import os
import sys

from jaxtag.cli.common import require_train_extra

require_train_extra("jaxtag-eval")

from absl import app, flags, logging  # noqa: E402  (after the check: absent in a core install)

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir the dataset was built in.")
flags.DEFINE_string(
    "dataset",
    None,
    "Dataset as built: NAME or NAME/CONFIG (magnatagatune, msd, audio_folder, synthetic_tags).",
)
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_integer("batch_size", 8, "Clips (x 16 chunks) per batch.")
flags.DEFINE_enum("prefer", "best", ["best", "latest"], "For a workdir: which checkpoint to take.")
flags.DEFINE_string("out", None, "Where to write the JSON report.")
flags.mark_flags_as_required(["checkpoint", "dataset"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    from jaxtag import evaluate, runtime

    runtime.enable_compilation_cache()
    try:
        report = evaluate.evaluate_checkpoint(
            FLAGS.checkpoint,
            dataset=FLAGS.dataset,
            data_dir=os.path.expanduser(FLAGS.data_dir),
            split=FLAGS.split,
            batch_size=FLAGS.batch_size,
            prefer=FLAGS.prefer,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"run_eval: {err}", file=sys.stderr)
        return 2
    print(evaluate.format_table(report))
    out = FLAGS.out or os.path.join(
        report["checkpoint"], f"eval_{FLAGS.dataset.replace('/', '_')}_{FLAGS.split}.json"
    )
    evaluate.write_report(report, out)
    print(f"report written to {out}")
    return 0


def run() -> None:
    """The ``jaxtag-eval`` console script (absl's --help prints this module's docstring)."""
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    run()
