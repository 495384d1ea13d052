"""Data-stage throughput: preprocessing (audio seconds per wall second) and input-pipeline crops/s.

    python bench/bench_data.py [--num_files 96] [--seconds 30] [--num_workers N]

1. Writes ``--num_files`` mp3 files (44.1 kHz stereo, ``--seconds`` long) of generated music.
2. Preprocessing: the builders' parallel path (``data_prep.common.compute_mels`` over a process
   pool, cache writes included, pool start-up included) against a single-process loop of
   ``librosa.load(path, sr=16000)`` + the same mel recipe, on the same files. Target: >= 1.8x on
   2 cores.
3. Input pipeline: builds an ``audio_folder`` dataset of those files (MTAT-sized clips when
   ``--seconds 30``) and times ``train_iterator`` (batch 16, one device) after a warm-up, with the
   in-memory cache (the default for small splits) and without it (reading the shards every pass).
   Target: >= 2,000 crops/s on 2 cores.

Numbers are printed, not asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_files(folder: str, num_files: int, seconds: float) -> list[str]:
    """mp3 files at 44.1 kHz stereo (typical user audio: decoding and resampling both count)."""
    import numpy as np
    import soundfile as sf

    sr = 44_100
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(num_files):
        rng = np.random.default_rng(i)
        notes = 110.0 * 2 ** (rng.integers(0, 36, size=int(seconds * 4)) / 12)
        f0 = np.repeat(notes, int(sr / 4) + 1)[: t.size]
        phase = 2 * np.pi * np.cumsum(f0) / sr
        y = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(t * 3.0))
        y = 0.2 * y + 0.02 * rng.standard_normal(t.size)
        path = os.path.join(folder, f"clip{i:04d}.mp3")
        sf.write(path, np.stack([y, 0.8 * y], axis=1).astype(np.float32), sr)
        paths.append(path)
    return paths


def librosa_loop(paths: list[str]) -> float:
    """The baseline: one process, librosa.load + the explicit recipe. Returns audio seconds."""
    import librosa

    total = 0.0
    for path in paths:
        y, sr = librosa.load(path, sr=16000)
        s = librosa.feature.melspectrogram(
            y=y, sr=sr, n_fft=512, hop_length=256, n_mels=96, window="hann", center=True,
            pad_mode="reflect", power=2.0,
        )  # fmt: skip
        librosa.amplitude_to_db(s, ref=1.0, amin=1e-5, top_db=80.0)
        total += len(y) / sr
    return total


def _warm_up(_: int) -> int:
    """What a fresh worker pays once: imports and librosa's first-call set-up."""
    import numpy as np

    from jaxtag import audio

    audio.log_mel(np.zeros(16000, np.float32))
    return os.getpid()


def pool_start_up(num_workers: int) -> float:
    """Seconds to start ``num_workers`` spawn workers and warm them up (measured on its own)."""
    from data_prep import common

    start = time.perf_counter()
    list(common._map(_warm_up, list(range(num_workers)), num_workers))
    return time.perf_counter() - start


def bench_preprocessing(paths: list[str], workdir: str, num_workers: int) -> None:
    from data_prep import common

    start = time.perf_counter()
    base_seconds = librosa_loop(paths)
    base_wall = time.perf_counter() - start

    start = time.perf_counter()
    results = common.compute_mels(
        [common.file_job(p) for p in paths], os.path.join(workdir, "cache"), num_workers
    )
    wall = time.perf_counter() - start
    seconds = sum(common.frames_to_seconds(r.frames) for r in results.values())
    print(f"\npreprocessing {len(paths)} files, {base_seconds / 60:.1f} min of audio")
    base_rate, rate = base_seconds / base_wall, seconds / wall
    print(f"  librosa loop, 1 process:  {base_rate:8.1f} s audio / s  ({base_wall:.1f} s)")
    print(f"  builder path, {num_workers} workers: {rate:8.1f} s audio / s  ({wall:.1f} s)")
    print(
        f"  speed-up: {rate / base_rate:.2f}x  (target >= 1.8x on 2 cores; pool start-up included)"
    )
    if num_workers > 1:
        start_up = pool_start_up(num_workers)
        steady = seconds / max(wall - start_up, 1e-9)
        print(
            f"  pool start-up (measured separately): {start_up:.1f} s; without it the builder path"
        )
        print(f"  runs at {steady:.1f} s audio / s, {steady / base_rate:.2f}x the librosa loop")


def bench_pipeline(paths: list[str], workdir: str, batches: int) -> None:
    import tensorflow_datasets as tfds

    from data_prep import audio_folder
    from jaxtag import input_pipeline as ip

    manual = os.path.dirname(paths[0])
    with open(os.path.join(manual, "tags.csv"), "w") as f:
        f.write("path,tags,split\n")
        f.writelines(f"{os.path.basename(p)},a;b,train\n" for p in paths)
    builder = audio_folder.AudioFolder(data_dir=os.path.join(workdir, "tfds"), num_workers=1)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual)
    )  # reuses the mel cache written above
    print(f"\ninput pipeline over {ip.num_examples(builder, 'train')} clips, batch 16, one device")
    for cache in (True, False):
        it = ip.train_iterator(
            builder, "train", global_batch_size=16, seed=0, num_local_devices=1, cache=cache
        )
        for _ in range(20):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        wall = time.perf_counter() - start
        shape = batch["mel"].shape
        label = "in-memory cache" if cache else "shards each pass"
        print(f"  {label:17s}: {batches * 16 / wall:8.0f} crops / s  (batches {shape})")
    print("  target >= 2,000 crops / s on 2 cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_files", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"cores: {os.cpu_count()}, load average (1 min) before the run: {load:.2f}")
    if load > 0.5:
        print("  warning: other processes are using the CPU; the parallel speed-up will be lower")
    with tempfile.TemporaryDirectory() as workdir:
        folder = os.path.join(workdir, "audio")
        os.makedirs(folder)
        start = time.perf_counter()
        paths = make_files(folder, args.num_files, args.seconds)
        print(f"wrote {len(paths)} mp3 files in {time.perf_counter() - start:.1f} s")
        bench_preprocessing(paths, workdir, args.num_workers)
        bench_pipeline(paths, workdir, args.batches)


if __name__ == "__main__":
    main()
