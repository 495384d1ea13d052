"""Embed audio files: `jaxtag embed FILE_OR_DIR... --checkpoint SRC --out OUT.npz`.

One vector per file (`Tagger.embed`): by default the pooled output the classifier reads,
averaged over the same windows as the file's tag prediction. `--layer` takes another
representation (`front_end`, `layer_<i>`, `pooled`); `--per-window` also keeps every adjacent
window's vector with its start time. `--engine onnx` and `--engine openvino` have only the pooled
output; `--engine auto` runs other layers with jax.

The `.npz` holds `paths` (N,), `durations` (N,), `embeddings` (N, D) float32 and `layer`; with
`--per-window` also `window_embeddings` (W, D), `window_starts` (W,) seconds and
`window_file_index` (W,). It is written atomically at the end; a rerun with the same `--out`
resumes an interrupted run (jaxtag/result_files.py). `--out` is checked before any work (not a
directory, not an input, not another program's file) and locked for the whole run. Unreadable
files are listed; exit code 1.
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxtag.cli import common
from jaxtag.errors import JaxtagError
from jaxtag.scoring import WINDOW_SECONDS, choose_engine

# One command line each, shown by `jaxtag embed --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag embed music/ --checkpoint ponswon --out embeddings.npz",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_input_arguments(parser)
    parser.add_argument("--out", required=True, metavar="OUT.npz", help="the .npz to write")
    parser.add_argument(
        "--layer",
        default="pooled",
        help="representation: pooled (default, the classifier's input), front_end, or layer_<i> "
        "(mean of encoder layer i's output tokens)",
    )
    parser.add_argument(
        "--per-window",
        action="store_true",
        help="also keep each ~4.1 s window's vector and its start time",
    )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.result_files import NpzFile, sidecar_path

        paths = common.input_paths(args, "jaxtag embed")
        outputs_given = [args.out, str(sidecar_path(args.out))]
        common.check_outputs(outputs_given, [*paths, args.checkpoint])  # before any work
        tagger = jaxtag.load(
            args.checkpoint, args.engine, args.batch_size, precision=args.precision
        )
        if args.layer not in tagger.layers:
            raise JaxtagError(f"--layer {args.layer!r}: this model has {', '.join(tagger.layers)}")
        choose_engine(args.engine, args.layer, precision=args.precision)  # onnx: no layers
        meta = {"layer": np.asarray(args.layer), "tags": np.asarray(tagger.tags)}
        window_key = "window_embeddings" if args.per_window else None
        out = NpzFile(args.out, "embeddings", meta, window_key, WINDOW_SECONDS)
        return common.run_to_files(tagger, paths, [out], args.layer, "jaxtag embed")

    return common.guarded("jaxtag embed", body, decodes=True)
