"""The `jaxtag` console command: everyday jobs on checkpoints and audio.

Each subcommand lives in the module that owns its stage and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `jaxtag --help` stays fast.
COMMANDS = {
    "convert": (
        "jaxtag.convert",
        "convert the released PyTorch weights (ponswon.pth) to a checkpoint",
    ),
    "info": ("jaxtag.info", "print a checkpoint's model config, tags and parameter count"),
    "tag": ("jaxtag.inference", "tag audio files (whole-file and per-window predictions)"),
    "embed": ("jaxtag.embed", "one vector per audio file (pooled output or a layer) to an .npz"),
    "explain": ("jaxtag.explain", "draw attention and tag-wise contribution heat maps for a chunk"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtag",
        description="Self-attention music tagging (Won, Chun & Serra 2019) in JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name, help=help_text, description=module.__doc__.strip().splitlines()[0]
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
