"""The command shells: `jaxtag` (this file), `jaxtag-train` (train.py), `jaxtag-eval`
(evaluate.py).

Each `jaxtag` subcommand is a module of this package exposing `add_arguments(parser)` and
`run(args) -> int`: argument parsing and output formatting over the Python API (jaxtag/api.py);
this file only wires them together. Only the module of the command being run is imported, and
command modules import JAX inside their functions, so `jaxtag --help` and `jaxtag CMD --help`
answer without loading JAX. The library never imports this package.

Every help ends with the page that documents the command (`DOCS`), after the command module's
`EXAMPLES`; `jaxtag --help` with the README and docs/.

`main` holds Ctrl-C for the whole command, parsing and imports included (jaxtag/cli/interrupts.py):
one line and exit 130 wherever it lands (a command's own `common.guarded` says what was kept),
and the process exits at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jaxtag
from jaxtag.cli.interrupts import INTERRUPTED, exit_now, sigint_handled

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
    "serve": ("jaxtag.cli.serve", "serve a model over HTTP, with a page to try it in a browser"),
}

# name -> the page that documents it (each command's --help ends with it).
DOCS = {
    "convert": "docs/tagging.md",  # the released weights
    "info": "docs/tagging.md",
    "tag": "docs/tagging.md",
    "embed": "docs/tagging.md",
    "explain": "docs/tagging.md",
    "export": "docs/serving.md",
    "serve": "docs/serving.md",
}
TOP_EPILOG = """\
examples:
  jaxtag tag song.mp3 --checkpoint ponswon
  jaxtag COMMAND --help    a command's options, an example and the page documenting it

training: jaxtag-train, jaxtag-eval (docs/training.md); datasets: jaxtag-build (docs/datasets.md)
documented in README.md and docs/ (tagging, serving, training, datasets, the Python API: api.md)
"""


def command_epilog(name: str, examples: tuple[str, ...]) -> str:
    """A command's help after its options: its examples, then the page that documents it."""
    lines = ["example:" if len(examples) == 1 else "examples:", *(f"  {e}" for e in examples), ""]
    return "\n".join([*(lines if examples else []), f"documented in {DOCS[name]}"])


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
        epilog=TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxtag {jaxtag.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        parser_of_command = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__.strip().splitlines()[0],
            epilog=command_epilog(name, tuple(getattr(module, "EXAMPLES", ()))),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser_of_command)
        parser_of_command.set_defaults(run=module.run)
    return parser


def _interrupted(command: str | None) -> int:
    print(f"\njaxtag{' ' + command if command else ''}: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # the process's own entry point: the console script, python -m jaxtag
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _chosen_command(argv)
    INTERRUPTED.clear()
    with sigint_handled():
        try:
            args = build_parser(command).parse_args(argv)
            from jaxtag.runtime import enable_compilation_cache

            enable_compilation_cache()  # JAXTAG_CACHE_DIR, or "off"; before anything compiles
            code = args.run(args)
        except Exception:
            if not INTERRUPTED.is_set():
                raise
            code = _interrupted(command)  # a library turned Ctrl-C into its own error
        except KeyboardInterrupt:
            code = _interrupted(command)
    if entry and code == 130:
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
