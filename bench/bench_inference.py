"""Tagging speed: jaxtag against the PyTorch reference, and tag-wise maps against a slow loop.

    python bench/bench_inference.py

Prints, on the released architecture with random weights (speed does not depend on them):
- seconds to tag one 30 s clip after warm-up (decode + log-mel + 16 chunks + model), jaxtag's
  `Tagger` against the same audio front end followed by the PyTorch reference;
- seconds per minute of audio for a 5-minute file (adjacent windows);
- seconds for the tag-wise contribution maps of one chunk: jaxtag's single vectorised call
  against 257 sequential forward passes with the one-hot attention swapped in.
"""

from __future__ import annotations

import os
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

from jaxtag import audio, explain, inference  # noqa: E402
from jaxtag.checkpoint import LoadedModel  # noqa: E402
from jaxtag.model import MTSA, ModelConfig, init_variables  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_audio(path: Path, seconds: float) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 44_100)) / 44_100
    y = 0.2 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))
    sf.write(path, y.astype(np.float32), 44_100)


def main() -> None:
    config = ModelConfig()
    variables = init_variables(config, jax.random.PRNGKey(0))
    loaded = LoadedModel(config, [f"tag{i}" for i in range(50)], variables, {}, Path("."))
    tagger = inference.Tagger(loaded, batch_size=16)

    import torch
    import torch_reference as ref

    torch.set_num_threads(os.cpu_count() or 1)
    reference = ref.MTSA(ref.RELEASED).eval()

    with tempfile.TemporaryDirectory() as tmp:
        clip, track = Path(tmp) / "clip.wav", Path(tmp) / "track.wav"
        write_audio(clip, 30.0)
        write_audio(track, 300.0)

        def jax_clip() -> None:
            list(inference.tag_files(tagger, [str(clip)], progress=False))

        def torch_clip() -> None:
            chunks = audio.eval_chunks(audio.load_log_mel(clip))
            with torch.no_grad():
                reference(torch.from_numpy(chunks))

        def jax_track() -> None:
            list(inference.tag_files(tagger, [str(track)], progress=False))

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

    model = MTSA(config)
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
