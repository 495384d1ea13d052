"""Embed audio files with a checkpoint: `jaxtag embed FILE_OR_DIR... --checkpoint C --out OUT.npz`.

One vector per file: by default the pooled output the classifier reads (`MTSA.features`),
averaged over the same windows as the file's tag prediction (the 16-chunk protocol for clips up
to 31 s, adjacent windows for longer tracks; see jaxtag/inference.py, whose pipeline this
reuses). `--layer` takes another of `MTSA.representations` (`front_end`, `layer_<i>`, `pooled`);
`--per-window` also keeps every adjacent window's vector with its start time. `--engine onnx`
(jaxtag/inference.py) has only the pooled output; `--engine auto` runs other layers with jax.

The `.npz` holds `paths` (N,), `durations` (N,), `embeddings` (N, D) float32 and `layer`; with
`--per-window` also `window_embeddings` (W, D), `window_starts` (W,) seconds and
`window_file_index` (W,). It is written atomically at the end; a rerun with the same `--out`
resumes an interrupted run (jaxtag/result_files.py). Unreadable files are listed; exit code 1.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxtag import inference
from jaxtag.result_files import NpzFile, ResultFileError


def representation_names(num_layers: int) -> list[str]:
    """The names `MTSA.representations` returns, in model order."""
    return ["front_end", *(f"layer_{i}" for i in range(num_layers)), "pooled"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inference.add_input_arguments(parser)
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
    from jaxtag.checkpoint import CheckpointError, load_model
    from jaxtag.export import ExportError

    try:
        paths = inference.expand_inputs(args.inputs, args.files_from)
        if not paths:
            raise inference.InputError(
                "no input files (give files, directories or --files-from LIST)"
            )
        loaded = load_model(args.checkpoint)
        names = representation_names(loaded.config.num_layers)
        if args.layer not in names:
            raise inference.InputError(f"--layer {args.layer!r}: this model has {', '.join(names)}")
        scorer = inference.WindowScorer(loaded, args.batch_size, args.layer, args.engine)
        meta = {"layer": np.asarray(args.layer), "tags": np.asarray(loaded.tags)}
        window_key = "window_embeddings" if args.per_window else None
        out = NpzFile(args.out, "embeddings", meta, window_key, inference.WINDOW_SECONDS)
        return inference.run_to_files(scorer, paths, [out], "jaxtag embed", sys.stderr.isatty())
    except (inference.InputError, CheckpointError, ResultFileError, ExportError) as err:
        print(f"jaxtag embed: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return inference.interrupted("jaxtag embed")
