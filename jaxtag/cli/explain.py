"""Draw attention and tag-wise contribution maps for one chunk of an audio file.

`jaxtag explain FILE --checkpoint SRC --out fig.png` draws, for the ~4.1 s chunk of FILE that
starts at `--start` (`Tagger.explain`): the log-mel, the first layer's attention received by
each frame, the last layer's CLS-row attention per head and averaged, and the tag-wise
contribution maps. The figure format follows the suffix of `--out` (png, pdf, svg, ...). Only
the chunk and half a second around it are decoded, so a chunk of an hour-long file is quick.

`--out` and `--save-npz` are checked before any work: not a directory, not FILE or the model's
own file, not each other, in a folder that can be written; an existing one is replaced only if it
is what this command writes (a figure of the format its suffix names, an `.npz` of explain's
maps), each atomically.
"""

from __future__ import annotations

import argparse
import os

from jaxtag.cli import common

# How a file of each figure format begins; an existing figure is replaced only if it matches.
# svg may start with an XML declaration, a comment or whitespace: looked for in its first bytes.
FIGURE_SIGNATURES = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "pdf": (b"%PDF",),
    "jpg": (b"\xff\xd8\xff",),
    "jpeg": (b"\xff\xd8\xff",),
    "tif": (b"II*\x00", b"MM\x00*"),
    "tiff": (b"II*\x00", b"MM\x00*"),
    "eps": (b"%!PS",),
    "ps": (b"%!PS",),
    "svgz": (b"\x1f\x8b",),
    "webp": (b"RIFF",),
}
EXPLAIN_NPZ_KEYS = {
    "tags",
    "start_seconds",
    "mel",
    "probs",
    "contributions",
}  # Explanation.save_npz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an audio file (wav, flac, ogg, mp3)")
    parser.add_argument("--checkpoint", required=True, metavar="SRC", help=common.CHECKPOINT_HELP)
    parser.add_argument(
        "--out", required=True, help="figure path; the suffix picks the format (.png, .pdf, .svg)"
    )
    parser.add_argument(
        "--tags", default=None, help="comma-separated tags to map (default: the top 3 predicted)"
    )
    parser.add_argument(
        "--start", type=float, default=0.0, help="chunk start in seconds (>= 0, default 0)"
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder layer for the tag-wise maps (default: last)"
    )
    parser.add_argument("--save-npz", default=None, help="also write the raw maps to this .npz")


def is_figure(path: str, suffix: str) -> bool:
    """Whether the existing `path` looks like a figure of format `suffix` (False for formats
    without a signature: raw, rgba, pgf)."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if suffix == "svg":
        return b"<svg" in head or head.lstrip().startswith(b"<?xml")
    signatures = FIGURE_SIGNATURES.get(suffix)
    return bool(signatures) and head.startswith(signatures)


def is_explain_npz(path: str) -> bool:
    """Whether the existing `path` is an `.npz` of `jaxtag explain --save-npz`."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return EXPLAIN_NPZ_KEYS <= names


def check_outputs(args: argparse.Namespace, suffix: str) -> None:
    """Refuses, before any work, outputs that must not be written (see the module docstring)."""
    from jaxtag.fileio import OutputError

    common.check_outputs([args.out, args.save_npz], [args.file, args.checkpoint])
    if os.path.exists(args.out) and not is_figure(args.out, suffix):
        raise OutputError(
            f"{args.out} exists and is not a .{suffix} figure, so it was left untouched; "
            "choose another --out"
        )
    if args.save_npz and os.path.exists(args.save_npz) and not is_explain_npz(args.save_npz):
        raise OutputError(
            f"{args.save_npz} exists and is not an .npz of explain's maps, so it was left "
            "untouched; choose another --save-npz"
        )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.explain import figure_format

        suffix = figure_format(args.out)  # before any work: a suffix matplotlib cannot write
        check_outputs(args, suffix)
        tagger = jaxtag.load(args.checkpoint, engine="jax")
        tags = args.tags.split(",") if args.tags else None
        explanation = tagger.explain(args.file, start=args.start, tags=tags, layer=args.layer)
        explanation.plot(args.out)
        print(f"figure written to {args.out}")
        if args.save_npz:
            explanation.save_npz(args.save_npz)
            print(f"maps written to {args.save_npz}")
        return 0

    return common.guarded("jaxtag explain", body, "interrupted")
