"""`jaxtag serve` under load: do simultaneous uploads share model calls?

    python bench/bench_serve.py                   # 16 uploads of 30 s clips, released-size model
    python bench/bench_serve.py --clients 32 --seconds 60 --engine jax

Serves a released-size model (random weights: speed does not depend on them) with uvicorn on
127.0.0.1 (`jaxtag.server.app.serving_in_background`), then POSTs `--clients` different clips to
/api/tag: first one after the other (the baseline: each request alone with the model), then all
at once from as many threads. Prints both wall times, their ratio, and how many model calls each
took (`WindowBatcher.calls`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    import soundfile as sf

    paths, sr = [], 16_000
    t = np.arange(int(seconds * sr)) / sr
    for i in range(count):
        path = folder / f"clip{i:02d}.wav"
        sf.write(path, (0.3 * np.sin(2 * np.pi * (110 + 37 * i) * t)).astype(np.float32), sr)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    parser.add_argument("--engine", default="auto", choices=("auto", "jax", "onnx"))
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import httpx
    import jax

    import jaxtag
    from jaxtag.checkpoint import save_model
    from jaxtag.model import ModelConfig, init_variables
    from jaxtag.server.app import serving_in_background
    from jaxtag.serving import Service
    from jaxtag.tags import MTAT_TOP50

    folder = Path(tempfile.mkdtemp(prefix="jaxtag-bench-serve-"))
    config = ModelConfig()
    variables = jax.tree_util.tree_map(np.asarray, init_variables(config, jax.random.PRNGKey(0)))
    checkpoint = save_model(folder / "model", variables, config, list(MTAT_TOP50))
    clips = write_clips(folder, args.clients, args.seconds)
    service = Service(jaxtag.load(checkpoint, engine=args.engine, batch_size=args.batch_size))
    batcher = service.batcher("probabilities")

    with serving_in_background(service) as url, httpx.Client(base_url=url, timeout=600) as http:

        def ask(path: Path) -> None:
            with open(path, "rb") as f:
                response = http.post("/api/tag", files={"audio": (path.name, f.read())})
            response.raise_for_status()

        ask(clips[0])  # warm-up: compilation, first-call costs
        calls = batcher.calls
        started = time.perf_counter()
        for path in clips:
            ask(path)
        one_by_one, one_by_one_calls = time.perf_counter() - started, batcher.calls - calls
        calls = batcher.calls
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(ask, clips))
        together, together_calls = time.perf_counter() - started, batcher.calls - calls
    service.close()
    print(
        f"{args.clients} uploads of {args.seconds:g} s clips, released-size model, "
        f"{service.tagger.engine} engine, batch {args.batch_size}, jax {jax.__version__}:"
    )
    print(f"  one after the other: {one_by_one:7.2f} s  ({one_by_one_calls} model calls)")
    print(f"  all at once:         {together:7.2f} s  ({together_calls} model calls)")
    print(f"  all at once / one after the other: {together / one_by_one:.2f}")


if __name__ == "__main__":
    main()
