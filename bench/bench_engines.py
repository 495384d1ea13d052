"""CPU inference engines for the released layout: jaxtag (XLA, optionally with XLA_FLAGS),
onnxruntime on the `jaxtag export` graph (and OpenVINO where jaxtag.scoring has it), and the
PyTorch reference, same machine, same run.

    python bench/bench_engines.py                       # batch 16, 3 interleaved rounds
    python bench/bench_engines.py --rounds 5 --xla-flags=--xla_cpu_use_onednn=true

Each measurement runs in its own process (bench/bench_model.py's workers for jaxtag and torch,
`worker_engine` here for the jaxtag.scoring engines);
the engines take turns round by round, so load from other processes on a shared machine hits
them alike. All use every core. Prints ex/s per round, the median, the time to the first result
(jaxtag: compile; onnxruntime: graph built from the weights and session start), the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402  (the jaxtag and torch workers and the timing loop)

REPO = bench_model.REPO


def worker_engine(engine: str, batch: int, args: argparse.Namespace) -> dict:
    """A jaxtag.scoring engine (onnx, openvino...) on random weights: `WindowScorer`, as the
    commands run it; `args.precision`, when given, goes to it as `precision`."""
    import importlib.metadata

    import jax
    import numpy as np

    from jaxtag.checkpoint import LoadedModel
    from jaxtag.model import ModelConfig, init_variables
    from jaxtag.scoring import WindowScorer

    config = ModelConfig()
    variables = init_variables(config, jax.random.PRNGKey(0), bench_model.FRAMES)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    tags = [str(i) for i in range(config.num_tags)]
    loaded = LoadedModel(config, tags, variables, {}, Path("random"))
    options = {"precision": args.precision} if args.precision else {}
    t0 = time.perf_counter()  # graph built from the weights + session start (+ first call)
    scorer = WindowScorer(loaded, batch_size=batch, engine=engine, **options)
    rng = np.random.RandomState(0)
    mel = rng.uniform(-80, 40, (batch, config.n_mels, bench_model.FRAMES)).astype(np.float32)

    def step() -> None:
        scorer.predict_windows(mel)

    step()
    start_s = time.perf_counter() - t0
    seconds = bench_model._time_loop(step, args.warmup, args.min_seconds, args.min_iters)
    package = {"onnx": "onnxruntime"}.get(scorer.engine, scorer.engine)
    try:
        version = f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        version = package
    return {
        "examples_per_s": batch / seconds,
        "compile_s": start_s,
        "peak_rss_mb": bench_model._peak_rss_mb(),
        "version": f"{version}, {os.cpu_count()} threads",
    }


def run_worker(
    engine: str,
    batch: int,
    args: argparse.Namespace,
    xla_flags: str = "",
    precision: str | None = None,
) -> dict:
    """Inference at `batch` in a process of its own: engine "jax" or "torch" (bench_model's
    workers, float32) or a jaxtag.scoring engine (`worker_engine`)."""
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    what = f"{engine} {xla_flags} batch {batch}"
    if engine in ("jax", "torch"):
        case = f"infer:{precision or 'float32'}:{batch}"
        return bench_model.run_worker(engine, args, "--case-arg", case, env=env)
    cmd = [sys.executable, __file__, "--worker", engine, "--batch", str(batch)]
    cmd += ["--warmup", str(args.warmup), "--min-seconds", str(args.min_seconds)]
    cmd += ["--min-iters", str(args.min_iters)] + (["--precision", precision] * bool(precision))
    return bench_model.run_process(cmd, what, env, getattr(args, "timeout", None))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    family, model = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
    return f"{name} (family {family}, model {model}), {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--xla-flags",
        action="append",
        help="XLA_FLAGS for one more jaxtag measurement (repeatable; write --xla-flags=--flag=v); "
        "JAX's defaults are always measured",
    )
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=6.0)
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    # bench_model's workers: no compilation cache, the default front end, eager torch
    parser.set_defaults(cache_dir="off", front_end="auto", torch_compile=False)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker_engine(args.worker, args.batch, args)))
        return

    from jaxtag.scoring import ENGINES

    engines = [("onnxruntime", "onnx", "")]
    engines += [("openvino", "openvino", "")] * ("openvino" in ENGINES)
    engines += [
        (f"jaxtag {flags or '(default XLA flags)'}", "jax", flags)
        for flags in ["", *(args.xla_flags or [])]
    ]
    if not args.no_torch:
        engines.append(("torch reference", "torch", ""))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    starts: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    versions = {}
    for round_index in range(args.rounds):
        for name, engine, flags in engines:
            result = run_worker(engine, args.batch, args, flags)
            rates[name].append(result["examples_per_s"])
            starts[name].append(result["compile_s"])
            versions[engine] = result["version"]
            print(f"round {round_index + 1} {name:<45} {result['examples_per_s']:7.1f} ex/s")
    print(f"\nbatch {args.batch}, released layout, median of {args.rounds} rounds:")
    torch_rate = statistics.median(rates["torch reference"]) if not args.no_torch else None
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = f"  {median / torch_rate:.2f}x torch" if torch_rate else ""
        start = statistics.median(starts[name])
        print(f"  {name:<45} {median:7.1f} ex/s{ratio}  (first call {start:.1f} s)")
    print(
        f"\nmachine: {cpu_model()}; Python {platform.python_version()}; "
        f"{'; '.join(versions.values())}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
