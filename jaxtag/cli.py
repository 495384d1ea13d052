"""The `jaxtag` console command: everyday jobs on checkpoints and audio.

Each subcommand lives in the module that owns its stage and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together. Only the
module of the command being run is imported, and command modules import JAX inside their
functions, so `jaxtag --help` and `jaxtag CMD --help` answer without loading JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jaxtag

# name -> (module, one-line help).
COMMANDS = {
    "convert": (
        "jaxtag.convert",
        "convert the released PyTorch weights (ponswon.pth) to a checkpoint",
    ),
    "info": ("jaxtag.info", "print a checkpoint's model config, tags and parameter count"),
    "tag": ("jaxtag.inference", "tag audio files (whole-file and per-window predictions)"),
    "embed": ("jaxtag.embed", "one vector per audio file (pooled output or a layer) to an .npz"),
    "explain": (
        "jaxtag.explain_cli",
        "draw attention and tag-wise contribution heat maps for a chunk",
    ),
    "export": ("jaxtag.export", "write a checkpoint as an ONNX file for serving without JAX"),
}


def positive_int(text: str) -> int:
    """argparse type shared by the commands: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv: the first word that is not an option of `jaxtag` itself."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `jaxtag` parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="jaxtag",
        description="Self-attention music tagging (Won, Chun & Serra 2019) in JAX/Flax.",
    )
    parser.add_argument("--version", action="version", version=f"jaxtag {jaxtag.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        parser_of_command = sub.add_parser(
            name, help=help_text, description=module.__doc__.strip().splitlines()[0]
        )
        module.add_arguments(parser_of_command)
        parser_of_command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    from jaxtag.runtime import enable_compilation_cache

    enable_compilation_cache()  # JAXTAG_CACHE_DIR, or "off"; before anything compiles
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
