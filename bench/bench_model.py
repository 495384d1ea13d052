"""Model speed: examples per second, FLOPs, utilisation and compile times; torch for comparison.

    python bench/bench_model.py                          # train and infer, float32, batch 16 and 64
    python bench/bench_model.py --no-torch --case train:float32:16 --case infer:bfloat16:1024
    python bench/bench_model.py --compile-only           # compile seconds, first and cached
    python bench/bench_model.py --no-torch --front-end reference   # the plain convolutions

Each measurement runs in its own subprocess so that compile caches, thread pools and peak memory
(max RSS) of one framework never leak into the other. `train` is the model's whole training
computation, jitted on one device: training-mode BatchNorm with its statistics update, dropout, BCE
loss, gradients and an Adam update (jaxtag.train's pmapped step adds only the cross-device means).
`infer` is the eval-mode forward pass with sigmoid.

FLOPs per example are counted by XLA's cost analysis on the CPU backend, whatever device runs (the
GPU's leaves cuDNN convolutions out), for the network: the reference front end of
jaxtag/model/front_end.py, not the banded kernels' zero padding. Utilisation is achieved FLOP/s over
`--peak-tflops` for the compute dtype; known for H100 and H200 (dense, SXM): 989 TFLOP/s bfloat16,
67 float32 (full-precision float32 gets no TF32 tensor cores).

Compile times (`--compile-only`, also part of the default run): a fresh process compiles the train
and inference programs with JAX's persistent compilation cache (jaxtag/runtime.py) in an empty
temporary directory, then a second fresh process compiles them again from that cache.

Torch: the original's PyTorch reference (tests/torch_reference.py), eager, or (`--torch-compile`)
compiled, bf16 under CPU autocast. Needs no torch (skipped), TensorFlow, librosa, ml_collections.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES = 256
FLOP_BATCH = 2  # FLOPs are linear in the batch; counted at this size, per example
COMPILE_BATCH = 16  # the compile check's float32 programs
# Dense peak TFLOP/s by device kind and compute dtype (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float32": 67.0},
}
DEFAULT_CASES = ["train:float32:16", "train:float32:64", "infer:float32:16", "infer:float32:64"]


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str  # "train" or "infer"
    dtype: str  # "float32" or "bfloat16"
    batch: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            mode, dtype, batch = text.split(":")
            case = cls(mode, dtype, int(batch))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MODE:DTYPE:BATCH, got {text!r}") from None
        if mode not in ("train", "infer") or dtype not in ("float32", "bfloat16"):
            raise argparse.ArgumentTypeError(f"MODE train|infer, DTYPE float32|bfloat16: {text!r}")
        return case


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


def _programs(mode: str, config, batch: int, front_end="auto"):
    """(jitted function, example arguments on the default device) for `mode`; `front_end`: a
    name or a jaxtag.model.tuning.FrontEndKernels."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxtag.model.tuning import FrontEndKernels

    model = FrontEndKernels.of(front_end).model(config)
    rng = np.random.RandomState(0)
    mel = rng.uniform(-80, 40, (batch, config.n_mels, FRAMES)).astype(np.float32)
    tags = (rng.uniform(size=(batch, config.num_tags)) > 0.9).astype(np.float32)
    mel_init = jnp.zeros((1, config.n_mels, FRAMES))
    variables = jax.jit(lambda r: model.init(r, mel_init, train=False))(jax.random.PRNGKey(0))
    if mode == "infer":
        predict = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x)))
        return predict, jax.device_put((variables, mel))

    tx = optax.adam(1e-4)

    def train_step(state, batch, dropout_rng):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                batch["mel"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats"],
            )
            loss = optax.sigmoid_binary_cross_entropy(logits, batch["tags"]).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    args = jax.device_put((state, {"mel": mel, "tags": tags}, jax.random.PRNGKey(1)))
    return jax.jit(train_step, donate_argnums=(0,)), args


def worker_jax(case: Case, args: argparse.Namespace) -> dict:
    import jax

    from jaxtag.model import ModelConfig
    from jaxtag.model.tuning import FrontEndKernels, tune_front_end
    from jaxtag.runtime import enable_compilation_cache

    enable_compilation_cache(args.cache_dir)  # fills the cache the compile check reads

    config = ModelConfig(dtype=case.dtype)
    choice = FrontEndKernels.rule(args.front_end)
    if case.mode == "train":  # "auto" measured for this machine, as jaxtag.train does
        choice = tune_front_end(config, case.batch, FRAMES, args.front_end)
    fn, fn_args = _programs(case.mode, config, case.batch, choice)
    t0 = time.perf_counter()
    compiled = fn.lower(*fn_args).compile()
    compile_s = time.perf_counter() - t0
    holder = {"args": fn_args}

    if case.mode == "train":

        def step() -> None:
            state, batch, rng = holder["args"]
            state, loss = compiled(state, batch, rng)
            holder["args"] = (state, batch, rng)
            loss.block_until_ready()

    else:

        def step() -> None:
            compiled(*fn_args).block_until_ready()

    seconds = _time_loop(step, args.warmup, args.min_seconds, args.min_iters)
    device = jax.devices()[0]
    return {
        "examples_per_s": case.batch / seconds,
        "compile_s": compile_s,
        "peak_rss_mb": _peak_rss_mb(),
        "backend": jax.default_backend(),
        "device": str(device.device_kind),
        "front_end": choice.name,
        "version": f"jax {jax.__version__}",
    }


def worker_flops(mode: str) -> dict:
    """The network's FLOPs per example, from XLA's cost analysis on the CPU backend."""
    import jax

    from jaxtag.model import ModelConfig

    config = ModelConfig()
    with jax.default_device(jax.devices("cpu")[0]):  # the network's FLOPs, not the kernels'
        fn, fn_args = _programs(mode, config, FLOP_BATCH, front_end="reference")
        cost = fn.lower(*fn_args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops_per_example": float(cost["flops"]) / FLOP_BATCH}


def worker_compile(args: argparse.Namespace) -> dict:
    """Compile seconds of the float32 train and infer programs (COMPILE_BATCH), cache on."""
    from jaxtag.model import ModelConfig
    from jaxtag.runtime import enable_compilation_cache

    enable_compilation_cache(args.cache_dir)
    out = {}
    for mode in ("train", "infer"):
        fn, fn_args = _programs(mode, ModelConfig(), COMPILE_BATCH)
        t0 = time.perf_counter()
        fn.lower(*fn_args).compile()
        out[mode] = time.perf_counter() - t0
    return out


def worker_torch(case: Case, args: argparse.Namespace) -> dict:
    """The PyTorch reference, eager or under torch.compile (`args.torch_compile`); a bfloat16
    case runs its forward pass under CPU autocast (the loss in float32, outside it)."""
    import contextlib

    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torch_reference as ref

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = ref.MTSA(ref.RELEASED)
    net = torch.compile(model) if args.torch_compile else model  # inductor, compiled on call 1
    rng = np.random.RandomState(0)
    mel = torch.from_numpy(rng.uniform(-80, 40, (case.batch, 96, FRAMES)).astype(np.float32))
    tags = torch.from_numpy((rng.uniform(size=(case.batch, 50)) > 0.9).astype(np.float32))

    def autocast() -> contextlib.AbstractContextManager:
        if case.dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    t0 = time.perf_counter()
    if case.mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.BCELoss()

        def step() -> None:
            optimizer.zero_grad()
            with autocast():
                probs, _ = net(mel)
            loss = loss_fn(probs.float(), tags)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast():
                net(mel)

    step()
    compile_s = time.perf_counter() - t0
    seconds = _time_loop(step, args.warmup, args.min_seconds, args.min_iters)
    how = "torch.compile" if args.torch_compile else "eager"
    return {
        "examples_per_s": case.batch / seconds,
        "compile_s": compile_s,
        "peak_rss_mb": _peak_rss_mb(),
        "version": f"torch {torch.__version__} ({how}), {torch.get_num_threads()} threads",
    }


def run_process(
    cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float | None = None
) -> dict:
    """Runs a worker command in the repository; returns the JSON of its last stdout line."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: stopped after the {timeout:g} s timeout") from None
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit status {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(
    worker: str, args: argparse.Namespace, *extra: str, env: dict[str, str] | None = None
) -> dict:
    """Runs one of this file's workers with `args`' timing options in its own process."""
    cmd = [sys.executable, __file__, "--worker", worker, *extra]
    cmd += ["--warmup", str(args.warmup), "--min-seconds", str(args.min_seconds)]
    cmd += ["--min-iters", str(args.min_iters), "--cache-dir", args.cache_dir]
    cmd += ["--front-end", args.front_end] + (["--torch-compile"] * args.torch_compile)
    return run_process(cmd, f"{worker} {' '.join(extra)}", env, getattr(args, "timeout", None))


def peak_for(device: str, dtype: str, given: dict[str, float]) -> float | None:
    """Peak TFLOP/s for `dtype`: --peak-tflops first, then the table by device kind."""
    if dtype in given:
        return given[dtype]
    for kind, peaks in PEAK_TFLOPS.items():
        if kind in device:
            return peaks[dtype]
    return None


def parse_peaks(items: list[str]) -> dict[str, float]:
    peaks = {}
    for item in items:
        dtype, _, value = item.partition("=")
        if dtype not in ("float32", "bfloat16") or not value:
            raise SystemExit(f"bench_model.py: --peak-tflops wants DTYPE=TFLOPS, got {item!r}")
        peaks[dtype] = float(value)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case",
        type=Case.parse,
        action="append",
        help="MODE:DTYPE:BATCH, e.g. train:bfloat16:1024 (repeatable; default "
        + " ".join(DEFAULT_CASES)
        + ")",
    )
    parser.add_argument("--no-torch", action="store_true", help="measure jaxtag only")
    parser.add_argument("--torch-compile", action="store_true", help="torch under torch.compile")
    parser.add_argument(
        "--peak-tflops",
        nargs="+",
        default=[],
        metavar="DTYPE=TFLOPS",
        help="device peak for utilisation, e.g. bfloat16=989 float32=67 (H100/H200 known)",
    )
    parser.add_argument(
        "--front-end",
        default="auto",
        choices=["auto", "reference", "banded"],
        help="the front end's kernels (default auto: training measures them for this CPU, "
        "jaxtag/model/tuning.py; inference runs the banded ones on a CPU)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-time check")
    parser.add_argument("--compile-only", action="store_true", help="only the compile times")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=8.0)
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case-arg", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "flops":
            result = worker_flops(args.case_arg)
        elif args.worker == "compile":
            result = worker_compile(args)
        else:
            case = Case.parse(args.case_arg)
            work = worker_jax if args.worker == "jax" else worker_torch
            result = work(case, args)
        print(json.dumps(result))
        return

    peaks = parse_peaks(args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="jaxtag-cache-") as cache:
        # One persistent compilation cache, empty at the start, for every jaxtag process: a
        # measured case compiles cold (its compile column) and fills it for the compile check.
        args.cache_dir = cache
        results = measure(args, peaks)
    if args.json:
        from jaxtag.fileio import atomic_write

        atomic_write(args.json, json.dumps(results, indent=2))


def measure(args: argparse.Namespace, peaks: dict[str, float]) -> dict:
    results: dict = {"rows": [], "compile": None}
    if not args.compile_only:
        cases = args.case or [Case.parse(c) for c in DEFAULT_CASES]
        with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
        if not args.no_torch and not with_torch:
            print("note: torch is not installed; the torch comparison is skipped")
        flops = {
            m: run_worker("flops", args, "--case-arg", m)["flops_per_example"]
            for m in sorted({c.mode for c in cases})
        }
        for case in cases:
            spec = f"{case.mode}:{case.dtype}:{case.batch}"
            jx = run_worker("jax", args, "--case-arg", spec)
            th = None
            if with_torch and case.dtype == "float32":
                th = run_worker("torch", args, "--case-arg", spec)
            row = {"case": dataclasses.asdict(case), "jaxtag": jx, "torch": th}
            row["flops_per_example"] = flops[case.mode]
            row["peak_tflops"] = peak_for(jx["device"], case.dtype, peaks)
            results["rows"].append(row)
            _print_row(row)
        first = results["rows"][0]["jaxtag"]
        torch_version = next((r["torch"]["version"] for r in results["rows"] if r["torch"]), None)
        print(
            f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {first['version']}, backend {first['backend']} "
            f"({first['device']}), front end {first['front_end']}, "
            f"{torch_version or 'torch not measured'}, {time.strftime('%Y-%m-%d')}"
        )
    if not args.no_compile:
        first = {
            r["case"]["mode"]: r["jaxtag"]["compile_s"]
            for r in results["rows"]
            if r["case"]["dtype"] == "float32" and r["case"]["batch"] == COMPILE_BATCH
        }
        if len(first) < 2:  # not both measured above: a cold run fills a cache of its own
            args.cache_dir = tempfile.mkdtemp(dir=args.cache_dir)
            first = run_worker("compile", args)
        cached = run_worker("compile", args)
        results["compile"] = {"first": first, "cached": cached}
        print(
            f"compile seconds (float32, batch {COMPILE_BATCH}), fresh process, "
            f"empty cache / cached: train {first['train']:.1f} / {cached['train']:.1f}, "
            f"infer {first['infer']:.1f} / {cached['infer']:.1f}"
        )
    return results


HEADER_PRINTED = []


def _print_row(row: dict) -> None:
    if not HEADER_PRINTED:
        print(
            f"{'mode':<6} {'dtype':<9} {'batch':>5} {'jaxtag ex/s':>12} {'torch ex/s':>11} "
            f"{'ratio':>6} {'compile s':>9} {'GFLOP/ex':>9} {'TFLOP/s':>8} {'util':>6} "
            f"{'jax MB':>7}"
        )
        HEADER_PRINTED.append(True)
    case, jx, th = row["case"], row["jaxtag"], row["torch"]
    flops = row["flops_per_example"]
    tflops = flops * jx["examples_per_s"] / 1e12
    util = f"{100 * tflops / row['peak_tflops']:.1f}%" if row["peak_tflops"] else "-"
    th_rate = f"{th['examples_per_s']:.1f}" if th else "-"
    ratio = f"{jx['examples_per_s'] / th['examples_per_s']:.2f}x" if th else "-"
    print(
        f"{case['mode']:<6} {case['dtype']:<9} {case['batch']:>5} {jx['examples_per_s']:>12.1f} "
        f"{th_rate:>11} {ratio:>6} {jx['compile_s']:>9.1f} {flops / 1e9:>9.2f} "
        f"{tflops:>8.3f} {util:>6} {jx['peak_rss_mb']:>7.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
