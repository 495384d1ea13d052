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
import os

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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing ONNX file at out"
    )


def is_onnx_model(path: str | os.PathLike) -> bool | None:
    """Whether `path` holds an ONNX model (a ModelProto with an IR version and a graph); None
    when the onnx package is missing (then the export itself says so)."""
    try:
        import onnx
    except ImportError:
        return None
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":  # onnx writes field 1, ir_version, first: no need to parse more
            return False
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: not an ONNX file
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def check_out(out: str, source: str, overwrite: bool) -> None:
    """Refuses, before any work, an OUT that must not be written (see the module docstring)."""
    from jaxtag.fileio import OutputError, check_outputs

    if not out.lower().endswith(".onnx"):
        raise OutputError(f"{out}: the output must be a .onnx file")
    check_outputs([out], [source])
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out} already exists (pass --overwrite to replace it)")
        if is_onnx_model(out) is False:
            raise OutputError(
                f"{out} is not an ONNX model; --overwrite replaces only an ONNX file, so it was "
                "left untouched (choose another output path)"
            )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag

        check_out(args.out, args.checkpoint, args.overwrite)
        jaxtag.load(args.checkpoint, engine="jax").export(args.out, args.check)
        print(f"exported {args.checkpoint} -> {args.out}")
        return 0

    return common.guarded(
        "jaxtag export", body, "interrupted; the file is written whole or not at all"
    )
