"""Model speed: jaxtag against the PyTorch reference, same machine, same run.

    python bench/bench_model.py                 # batch 16 and 64, train and inference
    python bench/bench_model.py --batches 16 --no-torch --dtype bfloat16   # e.g. on a GPU/TPU

Each measurement runs in its own subprocess so that compile caches, thread pools and peak memory
(max RSS) of one framework never leak into the other. Training is a full optimizer step (Adam,
BCE, dropout on, BatchNorm in training mode) through jaxtag's pmapped `train_step`; inference is
the eval-mode forward pass with sigmoid. FLOPs per example come from XLA's cost analysis of the
jaxtag computation (the same network for both). torch uses as many threads as there are cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES = 256


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_loop(step, warmup: int, min_seconds: float, min_iters: int) -> float:
    """Seconds per call after `warmup` calls, over at least min_iters calls and min_seconds."""
    for _ in range(warmup):
        step()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        step()
        iters += 1
    return (time.perf_counter() - start) / iters


def worker_jax(mode: str, batch: int, dtype: str, args: argparse.Namespace) -> dict:
    import flax.jax_utils
    import jax
    import numpy as np
    import optax

    from jaxtag.model import MTSA, ModelConfig, init_variables

    config = ModelConfig(dtype=dtype)
    rng = np.random.RandomState(0)
    mel = rng.uniform(-80, 40, (batch, config.n_mels, FRAMES)).astype(np.float32)
    tags = (rng.uniform(size=(batch, config.num_tags)) > 0.9).astype(np.float32)
    t0 = time.perf_counter()
    if mode == "train":
        from jaxtag import train

        state = flax.jax_utils.replicate(
            train.create_train_state(config, optax.adam(1e-4), 0, FRAMES), jax.devices()[:1]
        )
        schedule = optax.constant_schedule(1e-4)
        p_step = jax.pmap(
            lambda s, b: train.train_step(s, b, schedule),
            axis_name=train.AXIS,
            donate_argnums=(0,),
            devices=jax.devices()[:1],
        )
        device_batch = jax.device_put({"mel": mel[None], "tags": tags[None]}, jax.devices()[0])
        flops = _flops(
            jax.jit(lambda s, b: train.train_step(s, b, schedule), donate_argnums=(0,)),
            jax.tree_util.tree_map(lambda x: x[0], state),
            {"mel": mel, "tags": tags},
            train_axis=True,
        )
        holder = {"state": state}

        def step() -> None:
            holder["state"], metrics = p_step(holder["state"], device_batch)
            metrics["loss"].block_until_ready()

    else:
        model = MTSA(config)
        variables = jax.device_put(init_variables(config, jax.random.PRNGKey(0), FRAMES))
        predict = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x)))
        x = jax.device_put(mel)
        flops = _flops(predict, variables, x)

        def step() -> None:
            predict(variables, x).block_until_ready()

    step()  # compile
    compile_s = time.perf_counter() - t0
    seconds = _time_loop(step, args.warmup, args.min_seconds, args.min_iters)
    return {
        "examples_per_s": batch / seconds,
        "compile_s": compile_s,
        "flops_per_example": flops / batch if flops else None,
        "peak_rss_mb": _peak_rss_mb(),
        "backend": jax.default_backend(),
        "devices": str(jax.devices()[0].device_kind),
        "version": f"jax {jax.__version__}",
    }


def _flops(fn, *args, train_axis: bool = False) -> float | None:
    """XLA's FLOP count of fn(*args) (train_step needs its pmap axis name bound: vmap over 1)."""
    import jax

    try:
        if train_axis:
            from jaxtag import train

            wrapped = jax.vmap(fn, axis_name=train.AXIS)
            args = jax.tree_util.tree_map(lambda x: x[None], args)
            lowered = jax.jit(wrapped).lower(*args)
        else:
            lowered = fn.lower(*args)
        cost = lowered.compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort: some backends do not report it
        return None


def worker_torch(mode: str, batch: int, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torch_reference as ref

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = ref.MTSA(ref.RELEASED)
    rng = np.random.RandomState(0)
    mel = torch.from_numpy(rng.uniform(-80, 40, (batch, 96, FRAMES)).astype(np.float32))
    tags = torch.from_numpy((rng.uniform(size=(batch, 50)) > 0.9).astype(np.float32))
    t0 = time.perf_counter()
    if mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.BCELoss()

        def step() -> None:
            optimizer.zero_grad()
            probs, _ = model(mel)
            loss = loss_fn(probs, tags)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(mel)

    step()
    compile_s = time.perf_counter() - t0
    seconds = _time_loop(step, args.warmup, args.min_seconds, args.min_iters)
    return {
        "examples_per_s": batch / seconds,
        "compile_s": compile_s,
        "peak_rss_mb": _peak_rss_mb(),
        "version": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }


def run_worker(framework: str, mode: str, batch: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        framework,
        "--mode",
        mode,
        "--batch",
        str(batch),
        "--dtype",
        args.dtype,
        "--warmup",
        str(args.warmup),
        "--min-seconds",
        str(args.min_seconds),
        "--min-iters",
        str(args.min_iters),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} {mode} batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"]
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true", help="measure jaxtag only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=8.0)
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["train", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = (
            worker_jax(args.mode, args.batch, args.dtype, args)
            if args.worker == "jax"
            else worker_torch(args.mode, args.batch, args)
        )
        print(json.dumps(result))
        return

    rows = []
    for mode in args.modes:
        for batch in args.batches:
            jx = run_worker("jax", mode, batch, args)
            th = None if args.no_torch else run_worker("torch", mode, batch, args)
            rows.append({"mode": mode, "batch": batch, "jaxtag": jx, "torch": th})
            _print_row(rows[-1])
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_version()}, {rows[0]['jaxtag']['version']}, "
        f"backend {rows[0]['jaxtag']['backend']} ({rows[0]['jaxtag']['devices']}), "
        f"{rows[0]['torch']['version'] if rows[0]['torch'] else 'torch not measured'}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


HEADER_PRINTED = []


def _print_row(row: dict) -> None:
    if not HEADER_PRINTED:
        print(
            f"{'mode':<6} {'batch':>5} {'jaxtag ex/s':>12} {'torch ex/s':>11} {'ratio':>6} "
            f"{'compile s':>9} {'GFLOP/ex':>9} {'GFLOP/s':>8} {'jax MB':>7} {'torch MB':>8}"
        )
        HEADER_PRINTED.append(True)
    jx, th = row["jaxtag"], row["torch"]
    flops = jx["flops_per_example"]
    gflop = f"{flops / 1e9:.2f}" if flops else "-"
    gflops = f"{flops * jx['examples_per_s'] / 1e9:.1f}" if flops else "-"
    th_rate = f"{th['examples_per_s']:.1f}" if th else "-"
    ratio = f"{jx['examples_per_s'] / th['examples_per_s']:.2f}x" if th else "-"
    th_mb = f"{th['peak_rss_mb']:.0f}" if th else "-"
    print(
        f"{row['mode']:<6} {row['batch']:>5} {jx['examples_per_s']:>12.1f} "
        f"{th_rate:>11} {ratio:>6} "
        f"{jx['compile_s']:>9.1f} {gflop:>9} {gflops:>8} {jx['peak_rss_mb']:>7.0f} {th_mb:>8}",
        flush=True,
    )


if __name__ == "__main__":
    main()
