"""Tagging speed: a folder of full-length tracks, jaxtag against the PyTorch reference, and
tag-wise maps against a slow loop.

    python bench/bench_inference.py                       # everything
    python bench/bench_inference.py --library-only --tracks 6 --minutes 4
    python bench/bench_inference.py --library-only --engines jax,onnx --rounds 3

Prints, on the released architecture with random weights (speed does not depend on them):
- seconds per minute of audio for `jaxtag tag DIR --csv OUT` on a folder of generated
  full-length tracks (44.1 kHz stereo mp3), after a warm-up on one short file (compilation), with
  its two halves measured alone: the audio front end (decode + resample + log-mel, one thread) and
  the model (the same number of windows, batched); with `--engines jax,onnx` each engine of
  `jaxtag tag --engine` in turn, round by round in one process (so load from other processes
  hits them alike), and each engine's start-up: a fresh `jaxtag tag` process on one short file
  with an empty compilation cache (load + jit compile, or ONNX graph + session, + one file);
- seconds to tag one 30 s clip after warm-up (decode + log-mel + 16 chunks + model), jaxtag's
  `Tagger` against the same audio front end followed by the PyTorch reference;
- seconds per minute of audio for a 5-minute file (adjacent windows);
- seconds for the tag-wise contribution maps of one chunk: jaxtag's single vectorised call
  against 257 sequential forward passes with the one-hot attention swapped in.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from jaxtag import audio, explain, scoring, streaming  # noqa: E402
from jaxtag.api import Tagger  # noqa: E402
from jaxtag.checkpoint import LoadedModel  # noqa: E402
from jaxtag.cli.common import run_to_files  # noqa: E402
from jaxtag.model import ModelConfig, build_model, init_variables  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_audio(path: Path, seconds: float, channels: int = 1, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 44_100)) / 44_100
    y = 0.2 * np.sin(2 * np.pi * 330 * (1 + seed / 10) * t) + 0.05 * rng.standard_normal(len(t))
    sf.write(path, np.stack([y, 0.8 * y][:channels], axis=1).astype(np.float32), 44_100)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def first_call_seconds(checkpoint: Path, clip: Path, engine: str, tmp: Path) -> float:
    """Wall time of a fresh `jaxtag tag CLIP --engine ENGINE` process, empty compilation cache."""
    cache = Path(tempfile.mkdtemp(dir=tmp))
    env = dict(os.environ, JAXTAG_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "jaxtag", "tag", str(clip), "--checkpoint", str(checkpoint)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--engine", engine], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def bench_engines(loaded: LoadedModel, args: argparse.Namespace, engines: list[str]) -> None:
    """`jaxtag tag DIR --csv OUT` with each engine, interleaved; and each engine's first call."""
    from jaxtag.checkpoint import save_model
    from jaxtag.result_files import CsvFile

    scorers = {e: Tagger(loaded, engine=e, batch_size=args.batch_size) for e in engines}
    per_minute: dict[str, list[float]] = {e: [] for e in engines}
    first_call: dict[str, list[float]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "library"
        folder.mkdir()
        for i in range(args.tracks):
            write_audio(folder / f"track{i:02d}.mp3", args.minutes * 60, channels=2, seed=i)
        warm = Path(tmp) / "warm.wav"
        write_audio(warm, 5.0)
        checkpoint = save_model(Path(tmp) / "ckpt", loaded.variables, loaded.config, loaded.tags)
        paths = scoring.expand_inputs([str(folder)])
        for scorer in scorers.values():
            list(scorer.score([str(warm)]))  # compile
        audio_minutes = args.tracks * args.minutes
        for round_index in range(args.rounds):
            order = list(scorers.items())  # alternate who goes first: load drifts in a round
            for engine, scorer in order[:: -1 if round_index % 2 else 1]:
                out = CsvFile(Path(tmp) / f"{engine}{round_index}.csv", scorer.tags)
                start = time.perf_counter()
                assert run_to_files(scorer, paths, [out], "probabilities", "bench") == 0
                per_minute[engine].append((time.perf_counter() - start) / audio_minutes)
                first_call[engine].append(first_call_seconds(checkpoint, warm, engine, Path(tmp)))
                print(
                    f"round {round_index + 1} {engine:<5} {per_minute[engine][-1]:.3f} s per "
                    f"minute of audio, first call {first_call[engine][-1]:.1f} s",
                    flush=True,
                )
    print(
        f"`jaxtag tag DIR --csv` on {args.tracks} x {args.minutes:g} min mp3 tracks (44.1 kHz "
        f"stereo), released-size model, batch {args.batch_size}, median of {args.rounds} rounds:"
    )
    for engine in engines:
        print(
            f"  --engine {engine:<5} {statistics.median(per_minute[engine]):.3f} s per minute of "
            f"audio; first call (one 5 s file, empty cache) "
            f"{statistics.median(first_call[engine]):.1f} s"
        )
    print(
        f"  CPU: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"jax {jax.__version__}\n"
    )


def bench_library(loaded: LoadedModel, tracks: int, minutes: float, batch_size: int) -> None:
    """`jaxtag tag DIR --csv OUT` on `tracks` generated tracks of `minutes` each."""
    from jaxtag.result_files import CsvFile

    scorer = Tagger(loaded, engine="jax", batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "library"
        folder.mkdir()
        for i in range(tracks):
            write_audio(folder / f"track{i:02d}.mp3", minutes * 60, channels=2, seed=i)
        warm = Path(tmp) / "warm.wav"
        write_audio(warm, 5.0)
        list(scorer.score([str(warm)]))  # compile
        paths = scoring.expand_inputs([str(folder)])

        start, cpu = time.perf_counter(), time.process_time()
        out = CsvFile(Path(tmp) / "tags.csv", scorer.tags)
        code = run_to_files(scorer, paths, [out], "probabilities", "bench")
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert code == 0

        start = time.perf_counter()
        mels = [streaming.stream_log_mel(p)[0] for p in paths]
        front_end = time.perf_counter() - start
        windows = sum(len(audio.sliding_window_starts(m.shape[-1])) for m in mels)
        batch = audio.sliding_windows(mels[0])[0][:batch_size]
        scorer.predict_windows(batch)
        start = time.perf_counter()
        for _ in range(0, windows, batch_size):
            scorer.predict_windows(batch)
        model = time.perf_counter() - start

    audio_minutes = tracks * minutes
    print(
        f"tag a folder of {tracks} x {minutes:g} min mp3 tracks (44.1 kHz stereo), batch "
        f"{batch_size}: {total / audio_minutes:.3f} s per minute of audio "
        f"({audio_minutes / total:.1f} audio min/s; target <= 0.200 s/min), "
        f"{cpu / audio_minutes:.3f} CPU-s per minute\n"
        f"  alone: front end {front_end / audio_minutes:.3f} s/min (one thread), model "
        f"{model / audio_minutes:.3f} s/min ({windows / audio_minutes:.1f} windows/min, "
        f"{windows / model:.1f} windows/s)\n"
        f"  CPU: {cpu_name()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=6, help="tracks in the folder (default 6)")
    parser.add_argument("--minutes", type=float, default=4.0, help="minutes a track (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per model call")
    parser.add_argument("--library-only", action="store_true", help="only the folder benchmark")
    parser.add_argument(
        "--engines",
        help="comma-separated `--engine`s (jax,onnx) to compare on the folder, instead of the "
        "folder benchmark's breakdown",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds with --engines (default 3)")
    args = parser.parse_args()

    config = ModelConfig()
    variables = jax.tree_util.tree_map(np.asarray, init_variables(config, jax.random.PRNGKey(0)))
    loaded = LoadedModel(config, [f"tag{i}" for i in range(50)], variables, {}, Path("."))
    if args.engines:
        bench_engines(loaded, args, args.engines.split(","))
    else:
        bench_library(loaded, args.tracks, args.minutes, args.batch_size)
    if args.library_only:
        return
    tagger = Tagger(loaded, engine="jax", batch_size=16)

    import torch
    import torch_reference as ref

    torch.set_num_threads(os.cpu_count() or 1)
    reference = ref.MTSA(ref.RELEASED).eval()

    with tempfile.TemporaryDirectory() as tmp:
        clip, track = Path(tmp) / "clip.wav", Path(tmp) / "track.wav"
        write_audio(clip, 30.0)
        write_audio(track, 300.0)

        def jax_clip() -> None:
            list(tagger.score([str(clip)]))

        def torch_clip() -> None:
            chunks = audio.eval_chunks(audio.load_log_mel(clip))
            with torch.no_grad():
                reference(torch.from_numpy(chunks))

        def jax_track() -> None:
            list(tagger.score([str(track)]))

        def torch_track() -> None:
            windows, _ = audio.sliding_windows(audio.load_log_mel(track))
            with torch.no_grad():
                for i in range(0, len(windows), 16):
                    reference(torch.from_numpy(windows[i : i + 16]))

        front_end = best_of(lambda: audio.load_log_mel(clip))
        rows = [
            ("tag one 30 s clip (s)", best_of(jax_clip), best_of(torch_clip)),
            (
                "tag 5 min track, s per minute",
                best_of(jax_track, 1) / 5,
                best_of(torch_track, 1) / 5,
            ),
        ]

    model = build_model(config)
    chunk = jnp.asarray(np.random.default_rng(1).uniform(-80, 40, (1, 96, 256)), jnp.float32)
    layer = config.num_layers - 1
    vectorised = best_of(
        lambda: explain.tag_contributions(model, variables, chunk, layer).block_until_ready()
    )
    one = jax.jit(
        lambda v, x, t: model.apply(
            v, x, attention_override=(layer, jax.nn.one_hot(t, 257)[None, None, None, :])
        )
    )

    def sequential() -> None:
        for t in range(257):
            one(variables, chunk, t).block_until_ready()

    rows.append(("tag-wise maps, one chunk (s)", vectorised, best_of(sequential, 1)))

    print(f"{'measurement':<32} {'jaxtag':>9} {'baseline':>9} {'speed-up':>9}")
    for name, ours, theirs in rows:
        print(f"{name:<32} {ours:>9.3f} {theirs:>9.3f} {theirs / ours:>8.1f}x")
    print(
        f"\nbaselines: PyTorch reference {torch.__version__} ({torch.get_num_threads()} threads) "
        f"for tagging; 257 sequential jitted jaxtag forward passes for the maps. The audio front "
        f"end (decode + resample + log-mel, shared by both) takes {front_end:.3f} s per 30 s clip. "
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores."
    )


if __name__ == "__main__":
    main()
