"""The command shells: `jaxtag` (this file), `jaxtag-train` (train.py), `jaxtag-eval`
(evaluate.py).

Each `jaxtag` subcommand is a module of this package exposing `add_arguments(parser)` and
`run(args) -> int`: argument parsing and output formatting over the Python API (jaxtag/api.py);
this file only wires them together. Only the module of the command being run is imported, and
command modules import JAX inside their functions, so `jaxtag --help` and `jaxtag CMD --help`
answer without loading JAX. The library never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jaxtag

# name -> (module, one-line help).
COMMANDS = {
    "convert": (
        "jaxtag.cli.convert",
        "convert the released PyTorch weights (ponswon.pth) to a checkpoint",
    ),
    "info": ("jaxtag.cli.info", "print a checkpoint's model config, tags and parameter count"),
    "tag": ("jaxtag.cli.tag", "tag audio files (whole-file and per-window predictions)"),
    "embed": (
        "jaxtag.cli.embed",
        "one vector per audio file (pooled output or a layer) to an .npz",
    ),
    "explain": (
        "jaxtag.cli.explain",
        "draw attention and tag-wise contribution heat maps for a chunk",
    ),
    "export": ("jaxtag.cli.export", "write a checkpoint as an ONNX file for serving without JAX"),
}


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
