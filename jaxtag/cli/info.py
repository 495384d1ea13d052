"""Print a model's config, tag list and parameter count."""

from __future__ import annotations

import argparse
import json

from jaxtag.cli import common

# One command line each, shown by `jaxtag info --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag info checkpoints/ponswon",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="SRC", help=common.CHECKPOINT_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag

        tagger = jaxtag.load(args.checkpoint, engine="jax")
        extra = {k: v for k, v in tagger.meta.items() if k not in ("model", "tags")}
        if args.json:
            record = {
                "path": str(tagger.path),
                "model": tagger.config.to_dict(),
                "tags": tagger.tags,
                "num_params": tagger.num_params,
                **extra,
            }
            print(json.dumps(record))
            return 0
        print(f"checkpoint: {tagger.path}")
        print("model config:")
        for key, value in tagger.config.to_dict().items():
            print(f"  {key}: {value}")
        print(f"parameters: {tagger.num_params:,}")
        for key, value in extra.items():
            print(f"{key}: {json.dumps(value)}")
        print(f"tags ({len(tagger.tags)}):")
        for i, tag in enumerate(tagger.tags):
            print(f"  {i:3d} {tag}")
        return 0

    return common.guarded("jaxtag info", body, "interrupted")
