"""jaxtag against PyTorch in one command: the original architecture's PyTorch reference (eager,
torch.compile, torch.compile + bf16 autocast) against every jaxtag engine and precision, train
and inference, on this machine's CPU, with the issue's targets checked from the numbers.

    python bench/bench_peers.py                          # batch 16 and 64, best of 3 rounds
    python bench/bench_peers.py --rounds 5 --seconds 10 --json peers.json
    python bench/bench_peers.py --cases infer --batch 16 # only inference, only batch 16
    python bench/bench_peers.py --cases torch-eager --cases xla --rounds 1 --seconds 1

Every configuration runs in a process of its own (bench/bench_model.py's jaxtag and torch
workers, bench/bench_engines.py's for the jaxtag.scoring engines), configurations take turns
round by round, and each reports its best round: load from other processes on a shared machine
then hits them alike and slows, never speeds, a best. JAX runs on the CPU (JAX_PLATFORMS=cpu)
and everything uses every core. A row that cannot run here is printed as "not available" with
the reason (an OpenVINO engine that jaxtag does not have yet, bf16 without bf16 units...); a
row that fails, or takes over `--timeout` seconds, is reported and left out of later rounds.
`--cases` takes a mode (infer, train) or a row name (torch-compile-bf16, xla, onnxruntime...:
see the table) and can be repeated.

Prints the CPU model and its vector / matrix flags, the versions, the date, a table per mode
(ex/s at each batch and the ratio to the original's eager float32) and PASS/FAIL lines for the
targets: jaxtag's fastest bf16-class inference >= 1.2x torch.compile + bf16 autocast, its fastest
float32 inference >= 1.2x torch.compile fp32, its float32 training >= 2x eager and >=
torch.compile fp32, at every batch measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engines  # noqa: E402  (the engine worker and the CPU model)
import bench_model  # noqa: E402  (the jaxtag and torch workers)

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PACKAGES = ("jax", "jaxlib", "flax", "torch", "onnxruntime", "openvino")
ORIGINAL = "torch-eager"  # the row every ratio is to


@dataclasses.dataclass(frozen=True)
class Row:
    mode: str  # "infer" or "train"
    name: str  # what --cases selects
    label: str
    worker: str  # "torch", "jax" (bench_model) or "engine" (bench_engines)
    precision: str  # "float32" or "bfloat16"
    option: str = ""  # torch: "compile"; jax: the front end; engine: the jaxtag.scoring engine

    @property
    def jaxtag(self) -> bool:
        return self.worker != "torch"


def _torch_rows(mode: str) -> list[Row]:
    return [
        Row(mode, "torch-eager", "original, eager PyTorch fp32", "torch", "float32"),
        Row(mode, "torch-compile", "original, torch.compile fp32", "torch", "float32", "compile"),
        Row(mode, "torch-compile-bf16", "original, torch.compile + bf16 autocast", "torch",
            "bfloat16", "compile"),
    ]  # fmt: skip


ROWS = [
    *_torch_rows("infer"),
    Row("infer", "xla", "jaxtag XLA fp32 (banded front end)", "jax", "float32", "banded"),
    Row("infer", "xla-reference", "jaxtag XLA fp32 (reference front end)", "jax", "float32",
        "reference"),
    Row("infer", "xla-bf16", "jaxtag XLA bf16 (dtype=bfloat16)", "jax", "bfloat16", "auto"),
    Row("infer", "onnxruntime", "jaxtag onnxruntime fp32", "engine", "float32", "onnx"),
    Row("infer", "openvino", "jaxtag OpenVINO fp32", "engine", "float32", "openvino"),
    Row("infer", "openvino-bf16", "jaxtag OpenVINO bf16", "engine", "bfloat16", "openvino"),
    *_torch_rows("train"),
    Row("train", "xla", "jaxtag XLA fp32 (front end measured for this CPU)", "jax", "float32",
        "auto"),
    Row("train", "xla-banded", "jaxtag XLA fp32 (banded front end, 12-row blocks)", "jax",
        "float32", "banded"),
    Row("train", "xla-bf16", "jaxtag XLA bf16 (dtype=bfloat16)", "jax", "bfloat16", "auto"),
]  # fmt: skip


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS this CPU has (jaxtag.autotune's reading of /proc/cpuinfo)."""
    from jaxtag.autotune import cpu_identity

    present = set(cpu_identity()["flags"])
    return {flag: flag in present for flag in CPU_FLAGS}


def versions() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def unavailable(row: Row) -> str | None:
    """Why `row` cannot run on this machine, or None when it can (as far as one can tell
    without running it)."""
    if row.worker == "torch" and importlib.util.find_spec("torch") is None:
        return "torch not installed"
    if row.worker != "engine":
        return None
    from jaxtag import scoring

    if row.option == "onnx":
        return scoring.onnx_runtime_missing()
    if row.option not in scoring.ENGINES:
        return f"jaxtag has no {row.option} engine (jaxtag.scoring.ENGINES: {scoring.ENGINES})"
    if importlib.util.find_spec(row.option) is None:
        return f"{row.option} not installed"
    if row.precision == "bfloat16":
        from jaxtag.engines import native_bf16  # OpenVINO's capabilities, then the flags

        if not native_bf16():
            return "no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16)"
    return None


def measure_one(row: Row, batch: int, args: argparse.Namespace) -> dict:
    """One measurement of `row` at `batch`, in a fresh process."""
    settings = argparse.Namespace(
        warmup=args.warmup,
        min_seconds=args.seconds,
        min_iters=args.min_iters,
        cache_dir=args.cache_dir,
        front_end=row.option if row.worker == "jax" else "auto",
        torch_compile=row.option == "compile",
        timeout=args.timeout,
        precision=row.precision if row.worker == "engine" and row.option != "onnx" else None,
    )
    if row.worker == "engine":
        return bench_engines.run_worker(row.option, batch, settings, precision=settings.precision)
    case = f"{row.mode}:{row.precision}:{batch}"
    return bench_model.run_worker(row.worker, settings, "--case-arg", case)


def reason_of(err: Exception) -> str:
    """The last non-empty line of a worker's error output: usually the exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__


def run_rounds(rows: list[Row], batches: list[int], args: argparse.Namespace) -> dict:
    """{(name, mode, batch): {"rates": [...], "first_call_s": [...], "version", "reason"}}."""
    results: dict = {}
    for row in rows:
        reason = unavailable(row)
        for batch in batches:
            results[row.mode, row.name, batch] = {"rates": [], "first_call_s": [], "reason": reason}
            if reason:
                print(f"{row.mode} {row.label}, batch {batch}: not available: {reason}")
    for round_index in range(args.rounds):
        for row in rows:
            for batch in batches:
                entry = results[row.mode, row.name, batch]
                if entry["reason"]:
                    continue
                try:
                    got = measure_one(row, batch, args)
                except (RuntimeError, ValueError) as err:  # a failed worker, its JSON garbled
                    entry["reason"] = f"failed: {reason_of(err)}"
                    print(
                        f"round {round_index + 1} {row.mode} {row.label}, batch {batch}: "
                        f"{entry['reason']}",
                        flush=True,
                    )
                    continue
                entry["rates"].append(got["examples_per_s"])
                entry["first_call_s"].append(got["compile_s"])
                entry["version"] = got["version"]
                print(
                    f"round {round_index + 1} {row.mode:<5} {row.label:<45} batch {batch:>3} "
                    f"{got['examples_per_s']:8.1f} ex/s",
                    flush=True,
                )
    return results


def best(results: dict, mode: str, name: str, batch: int) -> float | None:
    entry = results.get((mode, name, batch))
    return max(entry["rates"]) if entry and entry["rates"] else None


def print_tables(rows: list[Row], batches: list[int], results: dict, rounds: int) -> None:
    titles = {"infer": "inference", "train": "training step (Adam, dropout, training BatchNorm)"}
    for mode in ("infer", "train"):
        chosen = [r for r in rows if r.mode == mode]
        if not chosen:
            continue
        print(f"\n{titles[mode]}: ex/s, best of {rounds}; x = vs the original (eager PyTorch fp32)")
        print(f"{'':<45}" + "".join(f"{'batch ' + str(b):>22}" for b in batches))
        for row in chosen:
            cells = []
            for batch in batches:
                rate, base = (
                    best(results, mode, row.name, batch),
                    best(results, mode, ORIGINAL, batch),
                )
                reason = results[mode, row.name, batch]["reason"] or "-"
                if rate is None:
                    cells.append(f"{'failed' if reason.startswith('failed') else 'n/a':>22}")
                else:
                    ratio = f"{rate / base:.2f}x" if base else "-"
                    cells.append(f"{rate:>12.1f} {ratio:>8}")
            print(f"{row.label:<45}" + "".join(cells))
        for row in chosen:  # why a cell is n/a or failed
            reasons = {results[mode, row.name, b]["reason"] for b in batches} - {None}
            for reason in sorted(reasons):
                why = reason if reason.startswith("failed") else f"not available: {reason}"
                print(f"  {row.label}: {why}")


def targets(results: dict, batches: list[int]) -> list[dict]:
    """The issue's targets, each with its measured sides; "holds" is None where a side is
    missing."""
    jaxtag_infer = [r for r in ROWS if r.mode == "infer" and r.jaxtag]
    bf16 = [r for r in jaxtag_infer if r.precision == "bfloat16"]
    fp32 = [r for r in jaxtag_infer if r.precision == "float32"]
    out = []

    def fastest(names: list[Row], batch: int) -> tuple[float | None, str]:
        rated = [(best(results, r.mode, r.name, batch), r.label) for r in names]
        rated = [(rate, label) for rate, label in rated if rate is not None]
        return max(rated) if rated else (None, "no jaxtag row measured")

    for batch in batches:
        xla_train = (best(results, "train", "xla", batch), "jaxtag XLA fp32")
        checks = [
            ("inference", "bfloat16", fastest(bf16, batch), "torch-compile-bf16", 1.2),
            ("inference", "float32", fastest(fp32, batch), "torch-compile", 1.2),
            ("training", "float32", xla_train, "torch-eager", 2.0),
            ("training", "float32", xla_train, "torch-compile", 1.0),
        ]
        for what, precision, (rate, label), peer, factor in checks:
            mode = "infer" if what == "inference" else "train"
            peer_rate = best(results, mode, peer, batch)
            holds = None if rate is None or peer_rate is None else rate >= factor * peer_rate
            peer_label = next(r.label for r in ROWS if r.mode == mode and r.name == peer)
            out.append(
                {
                    "what": what,
                    "precision": precision,
                    "batch": batch,
                    "jaxtag": label,
                    "jaxtag_ex_s": rate,
                    "peer": peer_label,
                    "peer_ex_s": peer_rate,
                    "factor": factor,
                    "holds": holds,
                }
            )
    return out


def print_targets(checks: list[dict]) -> None:
    print("\ntargets:")
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[c["holds"]]
        sides = "not measured"
        if c["holds"] is not None:
            ratio = c["jaxtag_ex_s"] / c["peer_ex_s"]
            sides = (
                f"{c['jaxtag']} {c['jaxtag_ex_s']:.1f} ex/s vs {c['peer_ex_s']:.1f}: {ratio:.2f}x"
            )
        who = "jaxtag's fastest" if c["what"] == "inference" else "jaxtag"
        print(
            f"{verdict} {c['what']} {c['precision']}, batch {c['batch']}: {who} >= "
            f"{c['factor']:g}x {c['peer']} ({sides})"
        )


def machine() -> dict:
    flags = cpu_flags()
    return {
        "cpu": bench_engines.cpu_model(),
        "flags": flags,
        "python": platform.python_version(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg()[0],
    }


def print_machine(info: dict) -> None:
    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["flags"].items())
    print(f"machine: {info['cpu']}")
    print(f"CPU flags: {flags}")
    print(f"Python {info['python']}; " + "; ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"date: {info['date']}; load average at the start {info['load_average']:.1f}")


def select(names: list[str] | None) -> list[Row]:
    if not names:
        return list(ROWS)
    known = {r.mode for r in ROWS} | {r.name for r in ROWS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"bench_peers.py: unknown --cases {unknown}; known: {sorted(known)}")
    return [r for r in ROWS if r.mode in names or r.name in names]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds (default 3)")
    parser.add_argument("--batch", type=int, action="append", help="repeatable (default 16, 64)")
    parser.add_argument("--cases", action="append", help="a mode or a row name (repeatable)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    parser.add_argument("--min-iters", type=int, default=3, help="timed calls at least")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds a measurement may take (default none)"
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    batches = args.batch or [16, 64]
    rows = select(args.cases)

    os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU comparison, whatever accelerator JAX sees
    info = machine()
    print_machine(info)
    with tempfile.TemporaryDirectory(prefix="jaxtag-cache-") as cache:
        args.cache_dir = cache  # later rounds load jaxtag's programs: compile time is not measured
        results = run_rounds(rows, batches, args)
    print_tables(rows, batches, results, args.rounds)
    checks = targets(results, batches)
    print_targets(checks)
    if args.json:
        from jaxtag.fileio import atomic_write

        table = []
        for r in rows:
            for b in batches:
                entry = {"mode": r.mode, "name": r.name, "label": r.label, "batch": b}
                entry["best_ex_s"] = best(results, r.mode, r.name, b)
                table.append(entry | results[r.mode, r.name, b])
        settings = {"rounds": args.rounds, "seconds": args.seconds, "batches": batches}
        report = {"machine": info, "settings": settings, "rows": table, "targets": checks}
        atomic_write(args.json, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
