"""Draw attention and tag-wise contribution maps for one chunk of an audio file.

`jaxtag explain FILE --checkpoint SRC --out fig.png` draws, for the ~4.1 s chunk of FILE that
starts at `--start` (`Tagger.explain`): the log-mel, the first layer's attention received by
each frame, the last layer's CLS-row attention per head and averaged, and the tag-wise
contribution maps; its title lists the whole file's top tags (the file is scored as `jaxtag
tag` does, streamed) and the chunk's. The figure format follows the suffix of `--out` (png, pdf,
svg, ...). With `--chunk-only` only the chunk and half a second around it are decoded, so a chunk
of an hour-long file is quick.

`--out` and `--save-npz` are checked before any work: not a directory, not FILE or the model's
own file, not each other, in a folder that can be written; an existing one is replaced only if it
is what this command writes (a figure of the format its suffix names, an `.npz` of explain's
maps), each atomically.
"""

from __future__ import annotations

import argparse

from jaxtag import audio
from jaxtag.cli import common

# One command line each, shown by `jaxtag explain --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag explain song.mp3 --checkpoint ponswon --out explain.png --start 30",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        metavar="FILE",
        help="an audio file (" + ", ".join(e[1:] for e in audio.AUDIO_EXTENSIONS) + ")",
    )
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
    parser.add_argument(
        "--chunk-only",
        action="store_true",
        help="read only the chunk (quick on a very long file); the title then lists the chunk's "
        "top tags but not the whole file's",
    )


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag.explain import check_destinations

        # Before any work: a suffix matplotlib cannot write, an input, a foreign file.
        check_destinations(args.out, args.save_npz, [args.file, args.checkpoint])
        tagger = jaxtag.load(args.checkpoint, engine="jax")
        tags = args.tags.split(",") if args.tags else None
        explanation = tagger.explain(
            args.file,
            start=args.start,
            tags=tags,
            layer=args.layer,
            file_tags=not args.chunk_only,
        )
        explanation.plot(args.out)
        print(f"figure written to {args.out}")
        if args.save_npz:
            explanation.save_npz(args.save_npz)
            print(f"maps written to {args.save_npz}")
        return 0

    return common.guarded("jaxtag explain", body, "interrupted", decodes=True)
