"""Write a model as an ONNX file for serving without JAX: `jaxtag export SRC OUT.onnx`.

The graph takes `log_mel` (batch, 96, 256) float32 chunks and returns `probabilities` and
`embedding` (jaxtag/export.py). Before the file is written the graph is run with onnxruntime
against jaxtag (`--no-check` skips this), so a file on disk is one that reproduced the model.

OUT is checked before any work: a `.onnx` path, not a directory, not the model's own file, in
a folder that can be written. An existing OUT is replaced only with `--overwrite` (as `jaxtag
convert` does) and only if it is an ONNX model; the file is written atomically, so a failure
(a full disk, Ctrl-C) leaves the old one whole.
"""

from __future__ import annotations

import argparse

from jaxtag.cli import common

# One command line each, shown by `jaxtag export --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag export checkpoints/ponswon ponswon.onnx",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="SRC", help=common.CHECKPOINT_HELP)
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip running the graph with onnxruntime against jaxtag before writing",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing ONNX file at out"
    )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.export import check_destination

        check_destination(args.out, args.checkpoint, args.overwrite)  # before loading the model
        jaxtag.load(args.checkpoint, engine="jax").export(args.out, args.check, args.overwrite)
        print(f"exported {args.checkpoint} -> {args.out}")
        return 0

    return common.guarded(
        "jaxtag export", body, "interrupted; the file is written whole or not at all"
    )
