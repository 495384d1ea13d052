"""Convert PyTorch weights to a jaxtag checkpoint: `jaxtag convert SRC OUT_DIR`.

SRC is a `.pth` state dict of the MTSA model (the released `ponswon.pth`, or one a user trained
with the original code), or `ponswon`: the paper's released file, downloaded from the original
repository and verified against its git blob id first. The architecture is read off the tensor
shapes; only the head count, which no shape tells, is a flag.

    jaxtag convert ponswon checkpoints/ponswon
    jaxtag convert my_run.pth checkpoints/mine --tags my_tags.txt

OUT_DIR is checked before SRC is read: an existing one is replaced only with `--overwrite` and
only if it is a jaxtag checkpoint (or empty) that does not hold SRC; its folder must be
writable and have room for about SRC's size. A write that fails (a full disk, Ctrl-C) is one
line; orbax's temporary folder is removed and an old OUT_DIR kept whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxtag.cli import common

# One command line each, shown by `jaxtag convert --help` (jaxtag/cli/__init__.py).
EXAMPLES = (
    "jaxtag convert ponswon checkpoints/ponswon",
    "jaxtag convert my_run.pth checkpoints/mine --tags my_tags.txt",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a PyTorch state dict file (e.g. ponswon.pth), or 'ponswon' to download it"
    )
    parser.add_argument("out_dir", help="the checkpoint directory to write")
    parser.add_argument(
        "--heads",
        type=common.positive_int,
        default=None,
        help="attention heads (not visible in the weights; default 8, the released model's)",
    )
    parser.add_argument(
        "--tags", help="a file with one tag name per line (default: MTAT top-50 for 50 outputs)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.convert import describe, read_tags

        tags = read_tags(args.tags) if args.tags else None
        out = Path(args.out_dir).absolute()  # checked before anything is read or downloaded
        path, config = jaxtag.convert_weights(args.source, out, args.heads, tags, args.overwrite)
        print(f"converted {args.source} -> {path}")
        print(f"model: {describe(config)}")
        return 0

    return common.guarded(
        "jaxtag convert", body, "interrupted; the checkpoint is written whole or not at all"
    )
