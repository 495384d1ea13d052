"""Tag audio files: `jaxtag tag FILE_OR_DIR... --checkpoint SRC`.

A file's tags are the mean of its windows' probabilities (`Tagger.predict`: the 16-chunk
evaluation protocol up to 31 s, adjacent ~4.1 s windows beyond); `--segments` also prints every
window's tags. `--csv`, `--jsonl` and `--taggram` write result files that a rerun resumes
(jaxtag/result_files.py): each is checked before any work (not a directory, not one of the
inputs, not another program's file) and locked for the whole run (a second `jaxtag tag` writing
the same file stops at once, naming the first one's PID).
Windows of several files share one batch and long files are decoded block by block, so memory
stays bounded. A file that cannot be read is reported and skipped (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxtag.cli import common
from jaxtag.scoring import WINDOW_SECONDS, Scored, top_tags


def to_json(result: Scored, tags: list[str], k: int) -> dict:
    """One file's JSON record: `tags` as `[{"label", "score"}]` best first, and `segments`."""

    def labelled(probs: np.ndarray) -> list[dict]:
        return [{"label": t, "score": round(p, 4)} for t, p in top_tags(probs, tags, k)]

    record: dict = {"file": result.path}
    if result.error:
        record["error"] = result.error
        return record
    record["duration"] = round(result.duration, 3)
    record["tags"] = labelled(result.output)
    if result.window_outputs is not None:
        record["segments"] = [
            {
                "start": round(float(s), 3),
                "end": round(float(s) + WINDOW_SECONDS, 3),
                "tags": labelled(wp),
            }
            for s, wp in zip(result.window_starts, result.window_outputs, strict=True)
        ]
    return record


def format_text(result: Scored, tags: list[str], k: int) -> str:
    if result.error:
        return f"{result.path}: ERROR {result.error}"

    def line(probs: np.ndarray) -> str:
        return "  ".join(f"{t} {p:.2f}" for t, p in top_tags(probs, tags, k))

    lines = [f"{result.path} ({result.duration:.1f} s): {line(result.output)}"]
    if result.window_outputs is not None:
        for s, wp in zip(result.window_starts, result.window_outputs, strict=True):
            lines.append(f"  {s:7.1f}-{s + WINDOW_SECONDS:7.1f} s  {line(wp)}")
    return "\n".join(lines)


# One command line each, shown by `jaxtag tag --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag tag song.mp3 music/ --checkpoint ponswon --top 10",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_input_arguments(parser)
    parser.add_argument(
        "--top", type=common.positive_int, default=5, help="tags to print per file (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.add_argument(
        "--segments", action="store_true", help="also print the tags of each ~4.1 s window"
    )
    parser.add_argument(
        "--csv",
        metavar="OUT.csv",
        help="write path, duration and every tag's probability, one "
        "row a file (a rerun skips the files already there)",
    )
    parser.add_argument("--jsonl", metavar="OUT.jsonl", help="the same as --csv as JSON lines")
    parser.add_argument(
        "--taggram",
        metavar="OUT.npz",
        help="write every file's (windows x tags) matrix with the window start times",
    )


def _print_results(tagger, paths: list[str], args: argparse.Namespace) -> int:
    failed = 0
    for result in tagger.score(paths, windows=args.segments, progress=sys.stderr.isatty()):
        if result.error:
            failed += 1
            print(f"jaxtag tag: error: {result.error}", file=sys.stderr)
            if not args.json:
                continue
        if args.json:
            record = to_json(result, tagger.tags, args.top)
            print(json.dumps(record, allow_nan=False), flush=True)
        else:
            print(format_text(result, tagger.tags, args.top), flush=True)
    if failed:
        print(f"jaxtag tag: {failed} of {len(paths)} files could not be tagged", file=sys.stderr)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.result_files import CsvFile, JsonlFile, NpzFile, ResultFile, sidecar_path

        paths = common.input_paths(args, "jaxtag tag")
        sidecar = args.taggram and str(sidecar_path(args.taggram))
        outputs_given = [args.csv, args.jsonl, args.taggram, sidecar]
        common.check_outputs(outputs_given, [*paths, args.checkpoint])  # before any work
        tagger = jaxtag.load(
            args.checkpoint, args.engine, args.batch_size, precision=args.precision
        )
        outputs: list[ResultFile] = []
        if args.csv:
            outputs.append(CsvFile(args.csv, tagger.tags))
        if args.jsonl:
            outputs.append(JsonlFile(args.jsonl, tagger.tags))
        if args.taggram:
            meta = {"tags": np.asarray(tagger.tags)}
            outputs.append(NpzFile(args.taggram, "probabilities", meta, "taggram", WINDOW_SECONDS))
        if outputs:
            return common.run_to_files(tagger, paths, outputs, "probabilities", "jaxtag tag")
        return _print_results(tagger, paths, args)

    return common.guarded("jaxtag tag", body, decodes=True)
