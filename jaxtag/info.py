"""Print a checkpoint's model config, tag list and parameter count."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a model checkpoint directory (from `jaxtag convert` or a training step) or a workdir",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from jaxtag.checkpoint import CheckpointError, load_model
    from jaxtag.model import count_params

    try:
        loaded = load_model(args.checkpoint)
    except CheckpointError as err:
        print(f"jaxtag info: {err}", file=sys.stderr)
        return 2
    n_params = count_params(loaded.variables["params"])
    if args.json:
        extra = {k: v for k, v in loaded.meta.items() if k not in ("model", "tags")}
        print(
            json.dumps(
                {
                    "path": str(loaded.path),
                    "model": loaded.config.to_dict(),
                    "tags": loaded.tags,
                    "num_params": n_params,
                    **extra,
                }
            )
        )
        return 0
    print(f"checkpoint: {loaded.path}")
    print("model config:")
    for key, value in loaded.config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"parameters: {n_params:,}")
    for key, value in loaded.meta.items():
        if key not in ("model", "tags"):
            print(f"{key}: {json.dumps(value)}")
    print(f"tags ({len(loaded.tags)}):")
    for i, tag in enumerate(loaded.tags):
        print(f"  {i:3d} {tag}")
    return 0
