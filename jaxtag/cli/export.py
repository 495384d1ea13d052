"""Write a model as an ONNX file for serving without JAX: `jaxtag export SRC OUT.onnx`.

The graph takes `log_mel` (batch, 96, 256) float32 chunks and returns `probabilities` and
`embedding` (jaxtag/export.py). Before the file is written the graph is run with onnxruntime
against jaxtag (`--no-check` skips this), so a file on disk is one that reproduced the model.
"""

from __future__ import annotations

import argparse

from jaxtag.cli import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="SRC", help=common.CHECKPOINT_HELP)
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip running the graph with onnxruntime against jaxtag before writing",
    )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        from pathlib import Path

        import jaxtag
        from jaxtag.errors import JaxtagError
        from jaxtag.fileio import unwritable_reason

        out = Path(args.out)
        if out.suffix.lower() != ".onnx":
            raise JaxtagError(f"{out}: the output must be a .onnx file")
        problem = unwritable_reason(out)
        if problem:
            raise JaxtagError(problem)
        jaxtag.load(args.checkpoint, engine="jax").export(out, args.check)
        print(f"exported {args.checkpoint} -> {out}")
        return 0

    return common.guarded("jaxtag export", body)
