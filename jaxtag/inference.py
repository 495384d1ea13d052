"""Tag audio files with a checkpoint: `jaxtag tag FILE... --checkpoint DIR`.

A file's prediction is the mean of its windows' sigmoid outputs: the 16-chunk evaluation
protocol for clips up to `PROTOCOL_MAX_SECONDS` (what the models are scored with), adjacent
256-frame windows (the last one flush with the end) for longer tracks. `--segments` reports every
window's tags over time. Windows of several files share one batch; decoding runs in a thread pool
ahead of the model. A file that cannot be read is reported and skipped; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxtag import audio
from jaxtag.checkpoint import CheckpointError, LoadedModel, load_model
from jaxtag.model import MTSA

PROTOCOL_MAX_SECONDS = 31.0  # MTAT clips are 29.1 s, MSD previews 30 s


@dataclasses.dataclass
class FileTags:
    path: str
    duration: float = 0.0  # seconds
    probs: np.ndarray | None = None  # (num_tags,) whole-file prediction
    window_starts: np.ndarray | None = None  # (N,) seconds, with --segments
    window_probs: np.ndarray | None = None  # (N, num_tags), with --segments
    error: str | None = None


@dataclasses.dataclass
class _Windows:
    path: str
    duration: float
    windows: np.ndarray | None  # (N, n_mels, frames)
    starts: np.ndarray | None  # (N,) start frames
    error: str | None = None


class Tagger:
    """A loaded model with a jitted, fixed-batch-size predictor (one compilation)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 32):
        self.loaded = loaded
        self.tags = loaded.tags
        self.batch_size = batch_size
        model = MTSA(loaded.config)
        self.variables = jax.device_put(loaded.variables)
        self._predict = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x)))

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int = 32) -> Tagger:
        return cls(load_model(path), batch_size)

    def predict_windows(self, windows: np.ndarray) -> np.ndarray:
        """(N, n_mels, frames) -> (N, num_tags) sigmoid outputs, in fixed-size padded batches."""
        out = []
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i : i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self._predict(self.variables, chunk))[: self.batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, len(self.tags)), np.float32)


def file_windows(mel: np.ndarray, segments: bool) -> tuple[np.ndarray, np.ndarray]:
    """The windows a file is scored on and their start frames (see the module doc)."""
    if segments or audio.frames_to_seconds(mel.shape[-1]) > PROTOCOL_MAX_SECONDS:
        return audio.sliding_windows(mel)
    starts = audio.eval_chunk_starts(mel.shape[-1])
    return audio.eval_chunks(mel), starts


def _load(path: str, segments: bool) -> _Windows:
    try:
        mel = audio.load_log_mel(path)
    except (audio.AudioError, OSError, ValueError) as err:
        return _Windows(path, 0.0, None, None, str(err))
    windows, starts = file_windows(mel, segments)
    duration = float(audio.frames_to_seconds(mel.shape[-1] - 1))
    return _Windows(path, duration, windows, starts)


def tag_files(
    tagger: Tagger,
    paths: Iterable[str],
    segments: bool = False,
    progress: bool = True,
    workers: int = 2,
) -> Iterator[FileTags]:
    """Yields one FileTags per path, in order; unreadable files come back with `error` set."""
    paths = list(paths)
    bar = tqdm(total=len(paths), unit="file", desc="tag", disable=not progress or len(paths) < 2)
    with ThreadPoolExecutor(workers) as pool:
        # Decode a few files ahead of the model, not all of them: spectrograms of thousands of
        # long tracks would otherwise pile up in memory.
        ahead = 2 * workers
        pending = deque(pool.submit(_load, p, segments) for p in paths[:ahead])
        group: list[_Windows] = []
        for index in range(len(paths)):
            group.append(pending.popleft().result())
            if index + ahead < len(paths):
                pending.append(pool.submit(_load, paths[index + ahead], segments))
            n_windows = sum(len(w.windows) for w in group if w.windows is not None)
            if n_windows < tagger.batch_size and index < len(paths) - 1:
                continue  # gather more files so the batch is full
            yield from _score(tagger, group, segments)
            bar.update(len(group))
            group = []
    bar.close()


def _score(tagger: Tagger, group: list[_Windows], segments: bool) -> Iterator[FileTags]:
    ok = [w for w in group if w.windows is not None]
    probs = tagger.predict_windows(np.concatenate([w.windows for w in ok])) if ok else None
    offset = 0
    for w in group:
        if w.windows is None:
            yield FileTags(w.path, error=w.error)
            continue
        p = probs[offset : offset + len(w.windows)]
        offset += len(w.windows)
        result = FileTags(w.path, w.duration, p.mean(axis=0))
        if segments:
            result.window_starts = np.asarray(audio.frames_to_seconds(w.starts), np.float64)
            result.window_probs = p
        yield result


def top_tags(probs: np.ndarray, tags: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(tags[i], float(probs[i])) for i in order]


def to_json(result: FileTags, tags: list[str], k: int) -> dict:
    record: dict = {"file": result.path}
    if result.error:
        record["error"] = result.error
        return record
    record["duration"] = round(result.duration, 3)
    record["tags"] = [
        {"tag": t, "probability": round(p, 4)} for t, p in top_tags(result.probs, tags, k)
    ]
    if result.window_probs is not None:
        window_seconds = float(audio.frames_to_seconds(audio.CHUNK_FRAMES))
        record["segments"] = [
            {
                "start": round(float(s), 3),
                "end": round(float(s) + window_seconds, 3),
                "tags": [{"tag": t, "probability": round(p, 4)} for t, p in top_tags(wp, tags, k)],
            }
            for s, wp in zip(result.window_starts, result.window_probs, strict=True)
        ]
    return record


def format_text(result: FileTags, tags: list[str], k: int) -> str:
    if result.error:
        return f"{result.path}: ERROR {result.error}"

    def line(probs: np.ndarray) -> str:
        return "  ".join(f"{t} {p:.2f}" for t, p in top_tags(probs, tags, k))

    lines = [f"{result.path} ({result.duration:.1f} s): {line(result.probs)}"]
    if result.window_probs is not None:
        window_seconds = float(audio.frames_to_seconds(audio.CHUNK_FRAMES))
        for s, wp in zip(result.window_starts, result.window_probs, strict=True):
            lines.append(f"  {s:7.1f}-{s + window_seconds:7.1f} s  {line(wp)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="model checkpoint directory or training workdir"
    )
    parser.add_argument("--top", type=int, default=5, help="tags to show per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.add_argument(
        "--segments", action="store_true", help="also print the tags of each ~4.1 s window"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="windows per model call")


def run(args: argparse.Namespace) -> int:
    try:
        tagger = Tagger.from_checkpoint(args.checkpoint, args.batch_size)
    except CheckpointError as err:
        print(f"jaxtag tag: {err}", file=sys.stderr)
        return 2
    failed = 0
    for result in tag_files(tagger, args.files, args.segments, progress=sys.stderr.isatty()):
        if result.error:
            failed += 1
            print(f"jaxtag tag: error: {result.error}", file=sys.stderr)
            if not args.json:
                continue
        if args.json:
            print(json.dumps(to_json(result, tagger.tags, args.top)), flush=True)
        else:
            print(format_text(result, tagger.tags, args.top), flush=True)
    if failed:
        print(
            f"jaxtag tag: {failed} of {len(args.files)} files could not be tagged", file=sys.stderr
        )
    return 1 if failed else 0
