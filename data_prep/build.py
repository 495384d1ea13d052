"""Builds a jaxtag dataset: ``python -m jaxtag.data_prep.build NAME --data_dir DIR [options]``.

(``jaxtag-build``; from a clone also ``python -m data_prep.build``.)

Heavy imports (TensorFlow, TFDS) happen inside :func:`main`: the mel computation's worker
processes are started with 'spawn', which re-imports this ``__main__`` module in each worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

import jaxtag  # noqa: F401  (sets TensorFlow's logging variables before TF is imported)
from jaxtag.cli.common import require_train_extra
from jaxtag.fileio import unwritable_reason

from . import BUILDERS, register

_EPILOG = """\
datasets:
  magnatagatune   MagnaTagATune top-50 (manual dir: annotations_final.csv + mp3 folders 0..f);
                  configs released_order (default: the released model's tag order), by_count
  msd             Million Song Dataset top-50 (manual dir: the split/tag pickles + mp3 previews)
  mtg_jamendo     MTG-Jamendo, official splits (manual dir: a clone of mtg-jamendo-dataset +
                  raw_30s/audio); configs top50tags (default), genre, instrument, moodtheme
                  (split-0), SUBSET-split1 .. SUBSET-split4
  audio_folder    your own audio + tags.csv with columns path,tags[,split] (tags split by ';' or
                  '|'); configs top50 (default), all
  synthetic_tags  generated clips with audible tags, no download; configs default (400 x 8 s),
                  small (60 x 6 s)

The log-mel of every clip is computed on --num_workers processes and cached under
DATA_DIR/downloads/mel_cache/NAME/, so rerunning after an interruption (Ctrl-C: exit 130) skips
finished clips. The cache is removed after a successful build unless --keep_cache. Broken audio
files are skipped and listed in the closing summary (and in the dataset's metadata). Listed paths
must stay inside the manual directory (links followed): absolute paths and paths leading outside
are refused, listed in the summary as errors and never read.

examples:
  {prog} synthetic_tags --data_dir ~/tensorflow_datasets
  {prog} magnatagatune --data_dir ~/tfds --manual_dir ~/mtat --config by_count

documented in docs/datasets.md
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    prog = f"python -m {__package__}.build"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Decode audio, compute 96-band log-mel spectrograms and write a TFDS dataset.",
        epilog=_EPILOG.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=BUILDERS, help="dataset to build")
    parser.add_argument(
        "--data_dir", required=True, help="TFDS data dir to write to (and read from later)"
    )
    parser.add_argument(
        "--manual_dir",
        help="folder with the downloaded files (default: DATA_DIR/downloads/manual)",
    )
    parser.add_argument("--config", help="builder config name (default: the dataset's default)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes decoding audio and computing mels (default: all cores, here %(default)s)",
    )
    parser.add_argument(
        "--keep_cache", action="store_true", help="keep the per-clip mel cache after success"
    )
    parser.add_argument(
        "--beam_pipeline_options",
        metavar="OPTIONS",
        help="run the example generation as an Apache Beam pipeline with these comma-separated "
        'PipelineOptions (the beam extra), e.g. "runner=DataflowRunner,project=P,region=R"; no '
        "mel cache, --num_workers unused",
    )
    return parser.parse_args(argv)


def beam_options(flags: str | None) -> Any:
    """``PipelineOptions`` of ``--beam_pipeline_options`` (split on commas as `tfds build` does),
    or None; exits naming the beam extra when apache-beam is not installed."""
    if not flags:
        return None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise SystemExit(
            "jaxtag-build: apache-beam not installed; --beam_pipeline_options needs the beam "
            "extra: pip install 'jaxtag[beam]'"
        ) from None
    return PipelineOptions(flags=[f"--{flag}" for flag in flags.split(",")])


def _remove_interrupted_builds(version_dir: str) -> None:
    """Deletes TFDS's ``incomplete.*`` folders left next to ``version_dir`` by a killed build.

    (The expensive part, the mel cache, is kept; these hold only half-written shards.)
    """
    parent, version = os.path.split(version_dir)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith("incomplete.") and entry.endswith("_" + version):
            print(f"removing the leftovers of an interrupted build: {os.path.join(parent, entry)}")
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


INTERRUPTED = "jaxtag-build: interrupted; rerun the same command to continue"


def directory_problem(path: str) -> str | None:
    """Why the build cannot write under the folder ``path``, or None (it may not exist yet)."""
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    if os.path.exists(path):
        return f"{path} is not a directory"
    return unwritable_reason(path)  # the nearest existing folder on the way must be writable


def _error_line(err: OSError) -> str:
    """``FILE: what happened`` for an OSError that names its file, else its first line."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def main(argv: list[str] | None = None) -> int:
    """Runs the build; returns the exit status: 0 ok, 1 bad input file, 2 missing input, an
    unusable --data_dir or a failed write (disk full), 130 interrupted (Ctrl-C; resumable), 141
    a reader of stdout gone (`jaxtag-build ... | head`)."""
    from jaxtag.cli.common import quiet_broken_pipe
    from jaxtag.cli.interrupts import sigint_handled

    try:
        with sigint_handled():  # a Ctrl-C inside a gc callback (JAX's) is raised, not dropped
            code = _build(argv)
            sys.stdout.flush()  # here, not at exit: a closed stdout is a quiet 141
            return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        # The mel workers ignore SIGINT (data_prep/common.py); finished clips stay cached.
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130


def _build(argv: list[str] | None) -> int:
    args = parse_args(argv)
    require_train_extra("jaxtag-build")
    beam = beam_options(args.beam_pipeline_options)
    import tensorflow_datasets as tfds

    from jaxtag import input_pipeline

    from . import common

    register()
    input_pipeline.quiet_tfds()
    cls = tfds.builder_cls(args.name)
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if args.config and args.config not in configs:
        print(
            f"error: {args.name} has no config {args.config!r}; choose from {configs}",
            file=sys.stderr,
        )
        return 2
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        print(f"error: --data_dir {data_dir} is not a directory", file=sys.stderr)
        return 2
    manual_dir = args.manual_dir and os.path.abspath(os.path.expanduser(args.manual_dir))
    if cls.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = manual_dir or os.path.join(data_dir, "downloads", "manual")
        if not os.path.isdir(manual):
            print(f"error: {args.name}: manual directory {manual} does not exist.", file=sys.stderr)
            print(cls.MANUAL_DOWNLOAD_INSTRUCTIONS, file=sys.stderr)
            return 2
    builder = cls(data_dir=data_dir, config=args.config, num_workers=args.num_workers)
    if builder.is_prepared():
        print(
            f"{builder.name}/{builder.builder_config.name} is already built at {builder.data_dir}"
        )
        return 0
    # Checked before any work, but after "already built": a read-only shared data dir answers.
    for folder in (
        data_dir,
        os.path.dirname(builder.data_dir),
        os.path.join(data_dir, "downloads"),
    ):
        problem = directory_problem(folder)
        if problem:
            print(f"error: --data_dir: {problem}", file=sys.stderr)
            return 2
    _remove_interrupted_builds(builder.data_dir)
    start = time.time()
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, beam_options=beam)
        )
    except common.ManualDirError as e:
        print(f"error: {e}", file=sys.stderr)
        if cls.MANUAL_DOWNLOAD_INSTRUCTIONS:
            print(cls.MANUAL_DOWNLOAD_INSTRUCTIONS, file=sys.stderr)
        return 2
    except common.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or a folder made read-only meanwhile
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 2
    report = builder.report
    report.start_time = start
    if not args.keep_cache and builder.cache_dir:
        shutil.rmtree(builder.cache_dir, ignore_errors=True)
    print(f"\n{builder.name}/{builder.builder_config.name} written to {builder.data_dir}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
