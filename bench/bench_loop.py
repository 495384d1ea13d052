"""The real training loop against the bare compiled train step, same model, same batch.

    python bench/bench_loop.py --model tiny --batch 16 --steps 300
    python bench/bench_loop.py --model released --batch 16 --steps 40

`train_and_evaluate` runs on an in-memory source (random spectrograms) with validation and
checkpoints as configured: two epochs, each ending in a validation pass and a checkpoint. Its
throughput leaves out the first step (compile), validation and checkpoint time, which are
printed separately; the bare step is the same pmapped `train_step` called back to back on one
batch already on the devices. `tiny` is a model whose step takes a few milliseconds on a CPU, so
that the loop's own overhead shows as it would next to a fast accelerator. Needs no TensorFlow,
TFDS, librosa or ml_collections.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVAL_CHUNKS = 16  # the evaluation protocol's chunks per clip (jaxtag/audio.py)
MODELS = {
    "tiny": ({"conv_channels": 1, "width": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32,
              "positions_length": 65}, 64),
    "released": ({}, 256),
}  # fmt: skip


def make_config(model: str, batch: int, steps: int) -> object:
    from configs.common import base_fields

    overrides, frames = MODELS[model]
    fields = base_fields()
    fields["model"] = {**fields["model"], **overrides, "num_tags": -1}
    fields.update(
        dataset="in-memory",
        crop_frames=frames,
        optimizer="adamw_cosine",
        learning_rate=1e-3,
        global_batch_size=batch,
        num_epochs=2,
        steps_per_epoch=max(steps // 2, 1),
        eval_batch_size=batch,
        log_every_steps=50,
        keep_best=1,
    )
    try:
        import ml_collections

        return ml_collections.ConfigDict(fields)
    except ImportError:  # e.g. an accelerator machine without it: a plain object does
        return types.SimpleNamespace(
            **{**fields, "model": types.SimpleNamespace(**fields["model"])}
        )


def make_source(config: object, num_tags: int = 50) -> object:
    from jaxtag.sources import ArraySource

    rng = np.random.default_rng(0)
    frames, batch = config.crop_frames, config.global_batch_size
    n_train, n_eval = 4 * batch, 2 * batch
    return ArraySource(
        rng.normal(-40, 15, (n_train, 96, frames)).astype(np.float32),
        rng.integers(0, 2, (n_train, num_tags)),
        rng.normal(-40, 15, (n_eval, EVAL_CHUNKS, 96, frames)).astype(np.float32),
        rng.integers(0, 2, (n_eval, num_tags)),
        [f"tag{i}" for i in range(num_tags)],
    )


def bare_step_rate(config: object, source: object, steps: int) -> float:
    """Examples/s of the compiled train step alone, on one batch already on the devices."""
    import flax.jax_utils
    import jax

    from jaxtag import optim, train

    run = train.resolve_run(config, source)
    tx, schedule = optim.create_optimizer(config, run.steps_per_epoch, run.total_steps)
    state = train.create_train_state(run.model, tx, config.seed, config.crop_frames)
    state = flax.jax_utils.replicate(state, axis_name=train.AXIS)
    batch = source.train_batches(config.global_batch_size, config.seed, 0)
    batch = next(flax.jax_utils.prefetch_to_device(batch, 1, axis_name=train.AXIS))
    step = train.make_p_train_step(schedule)
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * config.global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    import jax

    from jaxtag import runtime, train

    runtime.enable_compilation_cache()
    config = make_config(args.model, args.batch, args.steps)
    source = make_source(config)
    bare = bare_step_rate(config, source, args.steps)
    with tempfile.TemporaryDirectory() as workdir:
        summary = train.train_and_evaluate(config, workdir, source=source)
    loop = summary["examples_per_second"]
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    host = platform.processor() or platform.machine()
    print(
        f"\nmodel {args.model}, batch {args.batch}, {args.steps} steps, {device} ({host}), "
        f"jax {jax.__version__}"
    )
    rows = [
        ("bare step (ex/s)", f"{bare:,.0f}"),
        ("loop, excl. validation + checkpoints (ex/s)", f"{loop:,.0f}"),
        ("ratio loop / bare (target >= 0.9)", f"{loop / bare:.3f}"),
        ("validation (s, one pass per epoch, 2 epochs)", f"{summary['validation_seconds']:.2f}"),
        ("checkpoints (s, all saves)", f"{summary['checkpoint_seconds']:.2f}"),
        ("first step incl. compile (s)", f"{summary['first_step_seconds']:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


if __name__ == "__main__":
    main()
