r"""Evaluate a checkpoint on a dataset split: macro and per-tag ROC-AUC / PR-AUC.

--checkpoint takes a training workdir (its best checkpoint by validation ROC-AUC), a step
directory, or a converted ponswon.pth checkpoint. The table is printed and the full report is
written as JSON, beside the checkpoint and never inside it (orbax's rotation deletes a step
folder with all it holds): by default <workdir>/eval/eval_<dataset>_<split>_step<N>.json for a
workdir's step N (the one --prefer picks), <dir>_eval_<dataset>_<split>.json next to any other
checkpoint folder <dir>. The report path (--out or the default) is checked before the
evaluation: a folder, a read-only folder, a path inside a checkpoint, or an existing file that
is no jaxtag report is refused.

Exit codes: 0 done, 2 bad input or a failed write (disk full), 130 interrupted (Ctrl-C); each
failure is one line on stderr.

The same command: `python -m jaxtag.cli.evaluate`, or `python run_eval.py` from a clone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxtag.cli.common import guarded, require_train_extra
from jaxtag.cli.interrupts import INTERRUPTED, exit_now, sigint_handled
from jaxtag.errors import JaxtagError

require_train_extra("jaxtag-eval")

from absl import app, flags, logging  # noqa: E402  (after the check: absent in a core install)

from jaxtag.cli.flag_help import CommandHelp  # noqa: E402  (imports absl)

FLAGS = flags.FLAGS
REQUIRED_FLAGS = ["checkpoint", "dataset"]
flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir the dataset was built in.")
flags.DEFINE_string(
    "dataset",
    None,
    "Dataset as built: NAME or NAME/CONFIG (magnatagatune, msd, mtg_jamendo, audio_folder, "
    "synthetic_tags).",
)
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_integer("batch_size", 8, "Clips (x 16 chunks) per batch.")
flags.DEFINE_enum("prefer", "best", ["best", "latest"], "For a workdir: which checkpoint to take.")
flags.DEFINE_string(
    "out",
    None,
    "Where to write the JSON report (default: <workdir>/eval/eval_<dataset>_<split>_step<N>.json "
    "for a workdir, <dir>_eval_<dataset>_<split>.json beside any other checkpoint folder <dir>; "
    "never inside a checkpoint).",
)
flags.mark_flags_as_required(REQUIRED_FLAGS)
# --help (jaxtag/cli/flag_help.py): these flags, the examples, then the docstring above.
HELP = CommandHelp(
    prog="jaxtag-eval",
    module=sys.modules[__name__],
    summary=__doc__.splitlines()[0],
    notes=__doc__.split("\n", 1)[1],
    required=REQUIRED_FLAGS,
    metavars={
        "checkpoint": "SRC",
        "dataset": "NAME[/CONFIG]",
        "data_dir": "DIR",
        "batch_size": "N",
        "out": "OUT.json",
    },
    examples=[
        "jaxtag-eval --checkpoint runs/demo --dataset synthetic_tags --data_dir demo_workdir/data",
        "jaxtag-eval --checkpoint runs/mtat --dataset magnatagatune --data_dir ~/tfds --split test",
    ],
    docs="docs/training.md",
)


def evaluate_command(
    checkpoint_path: str,
    dataset: str,
    data_dir: str,
    split: str,
    batch_size: int,
    prefer: str,
    out: str | None,
) -> int:
    """Scores the checkpoint and writes its report; returns the exit code, each failure one
    line on stderr (2: bad input or a failed write; 130: interrupted)."""
    from jaxtag import checkpoint, evaluate

    def body() -> int:
        # The step is fixed first: the default report is named after it, and a training run
        # beside this eval may rotate `best/` meanwhile without changing what is scored.
        model_dir = checkpoint.resolve(checkpoint_path, prefer)
        if out:
            report_path = Path(os.path.expanduser(out))
        else:
            report_path = evaluate.default_report_path(model_dir, dataset, split)
        evaluate.check_report_path(report_path)
        try:
            report = evaluate.evaluate_checkpoint(
                str(model_dir), dataset=dataset, data_dir=data_dir, split=split,
                batch_size=batch_size, prefer=prefer,
            )  # fmt: skip
        except ValueError as err:  # also the data pipeline's, in its words
            if isinstance(err, JaxtagError):
                raise
            raise JaxtagError((str(err).strip().splitlines() or [repr(err)])[0]) from err
        print(evaluate.format_table(report))
        evaluate.write_report(report, report_path)
        print(f"report written to {report_path}")
        return 0

    INTERRUPTED.clear()
    with sigint_handled():
        return guarded("run_eval", body, interrupted="interrupted; no report written")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    from jaxtag import runtime

    runtime.enable_compilation_cache()
    return evaluate_command(
        FLAGS.checkpoint,
        FLAGS.dataset,
        os.path.expanduser(FLAGS.data_dir),
        FLAGS.split,
        FLAGS.batch_size,
        FLAGS.prefer,
        FLAGS.out,
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's own parsing (`app.parse_flags_with_usage`), ``--help`` (``-h``) answered first by
    `HELP`: the command's own flags, then examples."""
    HELP.exit_if_asked(argv)
    return app.parse_flags_with_usage(argv)


def run() -> None:
    """The ``jaxtag-eval`` console script (``--help``: `HELP`; ``--helpfull``: absl's listing of
    every flag after `HELP`'s text)."""
    sys.modules["__main__"].__doc__ = HELP.describe()
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as done:
        if done.code == 130:  # interrupted: exit now, as the jaxtag commands do (cli/__init__.py)
            exit_now(130)
        raise


if __name__ == "__main__":
    run()
