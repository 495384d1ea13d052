"""A Tagger for many clients at once: uploads in, the Python API's numbers out, as plain dicts.

`Service` is what `jaxtag serve` (jaxtag/server/app.py, jaxtag/cli/serve.py) answers with; it
knows nothing of HTTP. Each upload is decoded in the caller's thread; its windows then join one
`WindowBatcher`, whose single thread runs the model on windows of every request waiting, so
concurrent requests share model calls instead of queueing behind each other. A request's
numbers are those of `Tagger.tag` / `taggram` / `embed` / `explain` on the same file.

Every refusal is a `ServiceError` with the HTTP status it maps to and a one-line message that
names the upload by the client's file name (never a server-side path).
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtag import audio, scoring
from jaxtag.errors import JaxtagError
from jaxtag.version import __version__

if TYPE_CHECKING:
    from jaxtag.api import Tagger
    from jaxtag.explain import Explanation

DEFAULT_MAX_UPLOAD_MB = 200
DEFAULT_MAX_SECONDS = 3600.0


class ServiceError(JaxtagError):
    """A request the service refuses: `status` is the HTTP status code it answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the service."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
    max_seconds: float = DEFAULT_MAX_SECONDS  # audio duration


@dataclasses.dataclass(eq=False)
class _Job:
    windows: np.ndarray
    future: Future
    outputs: list[np.ndarray] = dataclasses.field(default_factory=list)
    taken: int = 0  # windows handed to the model so far


class WindowBatcher:
    """Scores the windows of concurrent requests together: one thread takes up to the scorer's
    batch size of windows from every request waiting (a large request spans several calls) and
    runs the model on them at once. `calls` and `requests_per_call` count what it ran (for tests and
    benchmarks)."""

    def __init__(self, scorer: scoring.WindowScorer):
        self.scorer = scorer
        self.calls = 0
        self.requests_per_call: list[int] = []
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jaxtag-batcher", daemon=True)
        self._thread.start()

    def submit(self, windows: np.ndarray) -> Future:
        """A Future of the `(N, D)` outputs of `windows` `(N, n_mels, 256)`."""
        future: Future = Future()
        if len(windows) == 0:
            future.set_result(np.zeros((0, 0), np.float32))
        else:
            self._queue.put(_Job(np.asarray(windows, np.float32), future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        pending: deque[_Job] = deque()
        while True:
            if not pending:
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # every request waiting now joins this call
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # finish what is pending first
                    break
                pending.append(job)
            self._call(pending)

    def _call(self, pending: deque[_Job]) -> None:
        room, parts = self.scorer.batch_size, []
        for job in pending:
            if room == 0:
                break
            take = min(room, len(job.windows) - job.taken)
            parts.append((job, job.taken, take))
            job.taken += take
            room -= take
        try:
            outputs = self.scorer.predict_windows(
                np.concatenate([job.windows[start : start + n] for job, start, n in parts])
            )
        except Exception as err:  # every request in the call gets the error, the thread lives
            for job, _, _ in parts:
                if job in pending:
                    pending.remove(job)
                    job.future.set_exception(err)
            return
        self.calls += 1
        self.requests_per_call.append(len(parts))
        offset = 0
        for job, _, n in parts:
            job.outputs.append(outputs[offset : offset + n])
            offset += n
        while pending and pending[0].taken == len(pending[0].windows):
            job = pending.popleft()
            job.future.set_result(np.concatenate(job.outputs))


class Service:
    """The tagger behind `jaxtag serve`: each method takes an uploaded file (saved at `path`;
    `name` is the client's file name) and returns what the HTTP API sends back as JSON."""

    def __init__(self, tagger: Tagger, limits: Limits | None = None, name: str | None = None):
        self.tagger = tagger
        self.name = name or tagger.path.name  # how /api/health and the page name the model
        self.limits = limits or Limits()
        self._batchers: dict[str, WindowBatcher] = {}
        self._lock = threading.Lock()
        self.batcher("probabilities")  # the model loads (and compiles) before the first request

    def batcher(self, output: str) -> WindowBatcher:
        """The batcher of one output ("probabilities" or one of `Tagger.layers`)."""
        with self._lock:
            if output not in self._batchers:
                self._batchers[output] = WindowBatcher(self.tagger.window_scorer(output))
            return self._batchers[output]

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()

    def health(self) -> dict[str, Any]:
        tagger = self.tagger
        return {
            "status": "ok",
            "model": self.name,
            "source": tagger.meta.get("source"),
            "tags": tagger.tags,
            "engine": tagger.engine,
            "precision": tagger.precision,
            "layers": tagger.layers,
            "num_params": tagger.num_params,
            "window_seconds": scoring.WINDOW_SECONDS,
            "limits": dataclasses.asdict(self.limits),
            "version": __version__,
        }

    # ------------------------------------------------------------------------------------------

    def tag(self, path: str, name: str, top_k: int = 5) -> dict[str, Any]:
        """`{"duration", "tags": [{"label", "score"}] best first, "probabilities": {tag: p}}`."""
        result = self._scored(path, name, "probabilities", windows=False)
        return self._tags(result, top_k)

    def taggram(self, path: str, name: str, top_k: int = 5) -> dict[str, Any]:
        """What `tag` answers, plus the taggram: `starts` (W,) seconds of the adjacent windows,
        `window_seconds`, `labels` (the tag order) and `taggram` (W, tags) probabilities."""
        result = self._scored(path, name, "probabilities", windows=True)
        return {
            **self._tags(result, top_k),
            "labels": self.tagger.tags,
            "window_seconds": scoring.WINDOW_SECONDS,
            "starts": np.asarray(result.window_starts, np.float64).tolist(),
            "taggram": result.window_outputs.astype(np.float32).tolist(),
        }

    def embed(self, path: str, name: str, layer: str = "pooled") -> dict[str, Any]:
        """`{"duration", "layer", "embedding": [D floats]}` averaged as `Tagger.embed` does."""
        if layer not in self.tagger.layers:
            raise ServiceError(f"layer {layer!r}: this model has {', '.join(self.tagger.layers)}")
        result = self._scored(path, name, layer, windows=False)
        return {
            "duration": result.duration,
            "layer": layer,
            "embedding": result.output.astype(np.float32).tolist(),
        }

    def explanation(
        self, path: str, name: str, start: float, tags: Sequence[str] | None = None
    ) -> Explanation:
        """`Tagger.explain` of the uploaded file's chunk at `start` seconds; the file's own
        probabilities (the figure's title) come through the batcher like any request's."""
        self._check_duration(path, name)
        try:
            explained = self.tagger.explain(path, start=start, tags=tags, file_tags=False)
        except JaxtagError as err:
            raise ServiceError(_renamed(str(err), path, name)) from err
        explained.file_probs = self._scored(path, name, "probabilities", windows=False).output
        explained.source = name
        return explained

    def explain(
        self, path: str, name: str, start: float, tags: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The maps of `explanation` as JSON: `start`, `chosen`, the chunk's `probabilities`,
        `times` (frames,) seconds and each map as nested lists."""
        explained = self.explanation(path, name, start, tags)
        maps = explained.maps
        return {
            "start": explained.start,
            "chosen": explained.chosen,
            "probabilities": explained.probabilities,
            "times": explained.times.tolist(),
            "first_layer_received": maps["first_layer_received"].tolist(),
            "last_layer_cls_heads": maps["last_layer_cls_heads"].tolist(),
            "last_layer_cls_mean": maps["last_layer_cls_mean"].tolist(),
            "contribution_layer": int(maps["contribution_layer"]),
            "contributions": {
                tag: column.tolist()
                for tag, column in zip(explained.chosen, explained.contributions.T, strict=True)
            },
        }

    def explain_png(
        self, path: str, name: str, start: float, tags: Sequence[str] | None = None
    ) -> tuple[bytes, float]:
        """The figure of `jaxtag explain` for that chunk, as PNG bytes, and the chunk's start
        (`start` on the frame grid)."""
        explained = self.explanation(path, name, start, tags)
        buffer = io.BytesIO()
        explained.write_figure(buffer, "png")
        return buffer.getvalue(), explained.start

    # ------------------------------------------------------------------------------------------

    def _tags(self, result: scoring.Scored, top_k: int) -> dict[str, Any]:
        probs = result.output.astype(np.float32)
        return {
            "duration": result.duration,
            "tags": self.tagger.top_tags(probs, top_k),
            "probabilities": {t: float(p) for t, p in zip(self.tagger.tags, probs, strict=True)},
        }

    def _check_duration(self, path: str, name: str) -> None:
        """Refuses audio longer than the limit from its header, before decoding (formats whose
        header libsndfile cannot read are measured after decoding, in `_scored`)."""
        import soundfile as sf

        try:
            info = sf.info(path)
        except Exception:  # not a libsndfile format (or not audio): the decoder will say
            return
        self._check_seconds(info.frames / max(info.samplerate, 1), name)

    def _check_seconds(self, seconds: float, name: str) -> None:
        if seconds > self.limits.max_seconds:
            raise ServiceError(
                f"{name}: {seconds:.0f} s of audio, more than this server takes "
                f"({self.limits.max_seconds:.0f} s)",
                status=413,
            )

    def _scored(self, path: str, name: str, output: str, windows: bool) -> scoring.Scored:
        self._check_duration(path, name)
        item = scoring.decode(path, windows)
        if item.error:
            raise ServiceError(_renamed(item.error, path, name))
        self._check_seconds(item.duration, name)
        rows = np.arange(len(item.starts))
        batcher = self.batcher(output)
        item.outputs = batcher.submit(np.stack([item.window(r) for r in rows])).result()
        item.scored = len(rows)
        result = scoring.result_of(batcher.scorer, item)
        if result.error:
            raise ServiceError(_renamed(result.error, path, name), status=500)
        return result


def _renamed(message: str, path: str, name: str) -> str:
    """`message` with the upload's server-side path (and its folder) replaced by `name`."""
    for where in (os.fspath(path), str(Path(path).parent)):
        message = message.replace(where, name)
    return message


def upload_name(filename: str | None) -> str:
    """The client's file name as error messages show it: its last component, printable, short;
    "upload" when there is none."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()[:200]
    return base or "upload"


def upload_suffix(name: str) -> str:
    """The suffix the saved upload keeps (decoders look at it), if it is an audio one."""
    suffix = Path(name).suffix.lower()
    return suffix if suffix in audio.AUDIO_EXTENSIONS else ""
