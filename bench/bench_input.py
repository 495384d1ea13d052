"""Training crops per second of the real input pipeline, by host cores used, per core.

    python bench/bench_input.py                    # 200 MTAT-length clips, 1..all cores
    python bench/bench_input.py --clips 400 --cores 1 2 --seconds 10

Builds a synthetic_tags dataset of `--clips` clips of 29.1 s (an MTAT clip: 96 x 1819 float16
mels, ~350 KB a record) with the real builder, then times `input_pipeline.train_iterator`
(batch 16, one device, one 256-frame crop per clip per pass) in a fresh process per
measurement, pinned to the first N cores (`os.sched_setaffinity`, TensorFlow's thread pools
sized to N), after a warm-up of 30 batches:

- `shards`: reading the TFRecord shards every pass (no cache: what MSD-sized data does);
- `cache`: the decoded split kept in memory (`cache=True`, the default for small splits);
- `all features`: the same pipeline decoding every stored feature (clip id, path, evidence),
  as jaxtag did before 2026-12-02: the baseline of the same run;
- `raw records`: `tf.data.TFRecordDataset` over the same shards, nothing parsed: the ceiling of
  any pipeline that reads each clip's whole record for one crop.

Prints crops/s and crops/s per core. Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = ("shards", "cache", "all features", "raw records")
BATCH = 16


def build(data_dir: str, clips: int) -> str:
    from data_prep import synthetic_tags

    config = synthetic_tags.SyntheticTagsConfig(name="bench", num_clips=clips, seconds=29.1)
    builder = synthetic_tags.SyntheticTags(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


def worker(dataset: str, mode: str, cores: int, seconds: float) -> dict:
    """Crops/s of `mode` on the first `cores` cores (run in a fresh process)."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    from jaxtag import input_pipeline as ip

    if mode == "raw records":
        files = sorted(glob.glob(os.path.join(dataset, "*-train.tfrecord-*")))
        batches = iter(tf.data.TFRecordDataset(files).repeat().batch(BATCH).prefetch(2))
    else:
        if mode == "all features":
            read = ip._read
            ip._read = lambda *a, features=(), **kw: read(*a, **kw)
        builder = ip.get_builder(dataset, None)
        batches = ip.train_iterator(
            builder,
            "train",
            global_batch_size=BATCH,
            seed=0,
            num_local_devices=1,
            cache=mode == "cache",
        )
    for _ in range(30):
        next(batches)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(batches)
        n += 1
    rate = n * BATCH / (time.perf_counter() - start)
    return {"mode": mode, "cores": cores, "crops_per_s": rate, "per_core": rate / cores}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=200, help="clips of 29.1 s to build")
    parser.add_argument("--cores", type=int, nargs="+", help="core counts (default 1..all)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per figure")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--worker", nargs=3, metavar=("DATASET", "MODE", "CORES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        dataset, mode, cores = args.worker
        print(json.dumps(worker(dataset, mode, int(cores), args.seconds)))
        return

    available = len(os.sched_getaffinity(0))
    cores = args.cores or list(range(1, available + 1))
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        start = time.perf_counter()
        dataset = build(tmp, args.clips)
        print(f"built {args.clips} clips of 29.1 s in {time.perf_counter() - start:.0f} s")
        results = []
        for n in cores:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--seconds", str(args.seconds)]
                out = subprocess.run(
                    [*cmd, "--worker", dataset, mode, str(n)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(
                    f"{mode:>13}  {n} core(s): {r['crops_per_s']:8.0f} crops/s "
                    f"{r['per_core']:8.0f} per core",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
