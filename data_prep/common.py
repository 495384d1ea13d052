"""Parallel, resumable log-mel computation shared by every builder (no TensorFlow in here).

Builders describe their clips as :class:`MelJob` s (a cache key plus a picklable
``fn(arg) -> mel``); :func:`compute_mels` runs the jobs that are not cached yet on a process pool
with a tqdm bar, each worker writing its result straight to the cache, and returns where every
result is. The TFDS ``_generate_examples`` step then only reads finished ``.npy`` files, so:

- decoding and mel computation use all cores (TFDS's own generation loop is single-threaded);
- a rerun after a kill (or a build of another config of the same dataset) redoes nothing that was
  finished: cache files are written whole or not at all (``jaxtag.fileio.atomic_write``), so a file
  that exists is complete. Failures (broken audio) are cached as a ``.err`` text file too, so known
  broken files are reported again without being decoded again.

A Beam build (``base.MelDatasetBuilder`` with Beam options) runs the same per-clip work,
:func:`compute_mel`, on the pipeline's workers instead, without the cache.

Keys include everything the result depends on (source path, size and mtime, the front-end
constants, a version), so a changed file or front end is recomputed rather than served stale.

This module is imported by the pool's worker processes (started with 'spawn', which is safe with
TensorFlow and JAX threads in the parent), so it stays free of TensorFlow imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import posixpath
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxtag import audio
from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write

MEL_DTYPE = np.float16
"""Storage dtype of the spectrograms (cache and dataset).

Log-mel values lie in [-100, ~+60] dB (a full-scale sine peaks near +54); float16 spacing there is
at most 0.0625, i.e. <= 0.031 dB rounding error, far below anything the model responds to (one
bin's value moves by more from one frame to the next). It halves disk and read bandwidth compared
with float32 (MTAT: ~6.7 GB instead of ~13 GB). Readers cast to float32."""

FRONT_END_ID = (
    f"sr{audio.SAMPLE_RATE}-fft{audio.N_FFT}-hop{audio.HOP}-mel{audio.N_MELS}-{audio.WINDOW}-"
    f"{audio.PAD_MODE}-p{audio.POWER}-ref{audio.DB_REF}-amin{audio.AMIN}-top{audio.TOP_DB}-v1"
)
"""Part of every cache key: changing a front-end constant invalidates the cache."""


class ManualDirError(FileNotFoundError):
    """The manual directory lacks something a builder needs; the message says what and where."""


class DataError(JaxtagError):
    """An input file (annotations, CSV, pickle) is malformed; the message names file and line."""


class UnsafePathError(DataError):
    """A listed audio path is absolute or leads outside the manual directory (links followed)."""

    def __init__(self, listed: str, reason: str):
        super().__init__(f"{listed}: {reason}")
        self.listed, self.reason = listed, reason


@dataclasses.dataclass(frozen=True)
class ConfinedPath:
    """A listed path that :func:`confine` accepted.

    Attributes:
      name: the path normalised (``posixpath.normpath``: no ``./``, ``//`` or inner ``..``),
        relative to the manual directory: what reports and the dataset's ``path`` show.
      real: the file it names, absolute, links resolved: what is read, and what makes two
        listed paths the same clip.
    """

    name: str
    real: str


def confine(root: str, listed: str) -> ConfinedPath:
    """Checks a ``/``-separated path that a dataset's files list relative to ``root``.

    One rule for every builder: a dataset may only read files inside its manual directory, so a
    listed path is refused (``UnsafePathError``) when it is absolute, when it leads outside
    ``root`` as written (``../``), or when it resolves outside ``root`` once links are followed
    (``os.path.realpath`` of both, then a ``commonpath`` check). A missing file inside ``root``
    is accepted here and reported as missing audio later.
    """
    if "\0" in listed:
        raise UnsafePathError(repr(listed), "contains a NUL character")
    if not listed:
        raise UnsafePathError("''", "an empty path")
    if posixpath.isabs(listed) or os.path.isabs(listed) or re.match(r"[A-Za-z]:[/\\]", listed):
        raise UnsafePathError(
            listed, "an absolute path (paths are relative to the manual directory)"
        )
    name = posixpath.normpath(listed)
    if name == ".." or name.startswith("../"):
        raise UnsafePathError(listed, f"leads outside the manual directory {root}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, listed))
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePathError(
            listed,
            f"resolves to {real}, outside the manual directory {root} (links are followed)",
        )
    return ConfinedPath(name, real)


@dataclasses.dataclass(frozen=True)
class MelJob:
    """One spectrogram to compute.

    Attributes:
      name: how reports refer to the clip (e.g. its path relative to the manual dir).
      key: cache identity; must change whenever the result would.
      fn: top-level (picklable) function ``fn(arg) -> float32 (N_MELS, T)``; may raise
        ``audio.AudioError`` (reported as a skip) — any other exception aborts the build.
      arg: its picklable argument.
    """

    name: str
    key: str
    fn: Callable[[Any], np.ndarray]
    arg: Any


def file_job(path: str, name: str | None = None) -> MelJob:
    """A job computing ``audio.load_log_mel(path)``, keyed by path, size, mtime and front end.

    A missing file still gets a job (keyed by its path) so it is reported like a broken one.
    """
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}-{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    key = hash_key(path, stamp, FRONT_END_ID)
    return MelJob(name=name or path, key=key, fn=audio.load_log_mel, arg=path)


def hash_key(*parts: object) -> str:
    """A stable hex digest of ``parts`` (their ``repr``), usable as a cache file name."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class MelResult:
    """Where a job's result is: ``path`` of the ``.npy`` file, or ``error`` if it failed."""

    path: str | None
    error: str | None
    frames: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class MelCache:
    """A directory of ``<key[:2]>/<key>.npy`` (float16 mel) and ``<key>.err`` (failure reason)."""

    def __init__(self, root: str):
        self.root = root

    def _base(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    def get(self, key: str) -> MelResult | None:
        """The cached result of ``key``, or None if it has not been computed."""
        base = self._base(key)
        if os.path.exists(base + ".npy"):
            return MelResult(base + ".npy", None, _npy_frames(base + ".npy"))
        if os.path.exists(base + ".err"):
            with open(base + ".err", encoding="utf-8") as f:
                return MelResult(None, f.read())
        return None

    def put(self, key: str, mel: np.ndarray) -> MelResult:
        path = self._base(key) + ".npy"
        with atomic_write(path, "wb") as f:
            np.save(f, np.asarray(mel, dtype=MEL_DTYPE))
        return MelResult(path, None, int(mel.shape[-1]))

    def put_error(self, key: str, message: str) -> MelResult:
        with atomic_write(self._base(key) + ".err", encoding="utf-8") as f:
            f.write(message)
        return MelResult(None, message)


def _npy_frames(path: str) -> int:
    """Number of frames of a cached mel, from the ``.npy`` header only (no data read)."""
    return int(np.load(path, mmap_mode="r").shape[-1])


def compute_mel(job: MelJob) -> tuple[np.ndarray | None, str | None]:
    """One clip's work, the same in the pool and in a Beam build (``base``): decode, resample
    and log-mel (``job.fn``), as stored (``MEL_DTYPE``); or None and why the audio is unusable
    (its ``audio.AudioError``). Any other exception is a bug and propagates."""
    try:
        mel = job.fn(job.arg)
    except audio.AudioError as e:
        return None, str(e)
    return np.asarray(mel, dtype=MEL_DTYPE), None


def _run_job(job_and_root: tuple[MelJob, str]) -> tuple[str, MelResult]:
    """Pool worker: computes one job and writes its result (or its AudioError) to the cache."""
    job, root = job_and_root
    cache = MelCache(root)
    mel, error = compute_mel(job)
    if error is not None:
        return job.key, cache.put_error(job.key, error)
    return job.key, cache.put(job.key, mel)


def compute_mels(
    jobs: Sequence[MelJob],
    cache_dir: str,
    num_workers: int | None = None,
    desc: str = "log-mel",
) -> dict[str, MelResult]:
    """Computes every job not in the cache; returns ``{job.key: MelResult}`` for all jobs.

    Args:
      jobs: the work; duplicates (same key) are computed once.
      cache_dir: cache root (builders use ``<data_dir>/downloads/mel_cache/<dataset>``).
      num_workers: processes; default all cores. 1 computes in this process (no pool start-up).
      desc: progress bar label.
    """
    from tqdm.auto import tqdm

    cache = MelCache(cache_dir)
    results: dict[str, MelResult] = {}
    todo: dict[str, MelJob] = {}
    for job in jobs:
        if job.key in results or job.key in todo:
            continue
        hit = cache.get(job.key)
        if hit is None:
            todo[job.key] = job
        else:
            results[job.key] = hit
    num_workers = num_workers or os.cpu_count() or 1
    num_workers = max(1, min(num_workers, len(todo)))
    work = [(job, cache_dir) for job in todo.values()]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="clip") as bar:
        for key, result in _map(_run_job, work, num_workers):
            results[key] = result
            bar.update(1)
    return results


_SINGLE_THREAD_ENV = {
    name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
}
"""Set in the workers: one process per core is the parallelism; BLAS threads on top of it only
add overhead (on a 2-core machine a multi-threaded mel product was 5x slower than one thread)."""


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Temporarily sets environment variables (inherited by processes started meanwhile)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (one line, jaxtag-build's exit 130);
    the pool's exit terminates the workers, which would otherwise each print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while workers start: they inherit it ignored from their first instruction
    (Python keeps an ignored SIGINT ignored), before their initializer could run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _map(fn: Callable, items: list, num_workers: int) -> Iterable:
    """``imap_unordered`` on a spawn pool of single-threaded workers, or a plain loop."""
    if num_workers <= 1 or len(items) <= 1:
        try:
            from threadpoolctl import threadpool_limits  # ships with scikit-learn
        except ImportError:  # pragma: no cover
            threadpool_limits = contextlib.nullcontext
        with threadpool_limits(1):
            yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with _environment(_SINGLE_THREAD_ENV), _sigint_ignored():
        pool = ctx.Pool(num_workers, initializer=_ignore_sigint)
    with pool:
        yield from pool.imap_unordered(fn, items, chunksize=1)


@dataclasses.dataclass
class BuildReport:
    """What a build did, for the closing summary and ``info.metadata``.

    Attributes:
      written: examples written per split.
      skipped: clip name -> reason, for clips that should have been written but could not
        (broken, empty or missing audio).
      dropped: reason -> count, for clips left out by the dataset's definition (e.g. MTAT clips
        with none of the top-50 tags).
      refused: listed path (or clip) -> reason, for paths that are absolute or lead outside the
        manual directory (:func:`confine`): errors in the dataset's files, never read.
      shorter_than_chunk: written clips shorter than one 256-frame chunk (~4.1 s), which readers
        pad; clips under ``MIN_CLIP_SECONDS`` are not written but skipped.
      audio_seconds: audio in the written examples (from frame counts, +-16 ms per clip).
      start_time: ``time.time()`` when the build started.
    """

    written: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    shorter_than_chunk: int = 0
    audio_seconds: float = 0.0
    start_time: float = dataclasses.field(default_factory=time.time)

    def summary(self, max_listed: int = 20) -> str:
        """Human-readable closing summary."""
        wall = time.time() - self.start_time
        total = sum(self.written.values())
        per_split = ", ".join(
            f"{k} {v}" if v else f"{k} 0: split not written"
            for k, v in sorted(self.written.items())
        )
        lines = [
            f"clips written: {total} ({per_split})",
            f"audio: {self.audio_seconds / 3600:.2f} h ({self.audio_seconds:.0f} s)",
            f"wall time: {wall:.1f} s",
            f"skipped (unusable audio): {len(self.skipped)}",
            *_listing(self.skipped, max_listed),
        ]
        if self.refused:
            lines.append(
                f"error: paths refused (absolute or outside the manual directory), not read: "
                f"{len(self.refused)}"
            )
            lines += _listing(self.refused, max_listed)
        if self.shorter_than_chunk:
            lines.append(
                f"shorter than one {chunk_seconds():.1f} s chunk (kept, padded when read): "
                f"{self.shorter_than_chunk}"
            )
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"dropped by design: {count} ({reason})")
        return "\n".join(lines)


def _listing(reasons: dict[str, str], max_listed: int) -> list[str]:
    """``  name: reason`` lines, sorted, at most ``max_listed`` of them and a count of the rest."""
    lines = [f"  {name}: {reason}" for name, reason in sorted(reasons.items())[:max_listed]]
    if len(reasons) > max_listed:
        lines.append(f"  ... and {len(reasons) - max_listed} more")
    return lines


MIN_CLIP_SECONDS = audio.MIN_CLIP_SECONDS  # one rule for the builders and `jaxtag tag`
too_short = audio.too_short


def chunk_seconds() -> float:
    return frames_to_seconds(audio.CHUNK_FRAMES)


def frames_to_seconds(frames: int) -> float:
    """Approximate audio duration of a clip with ``frames`` centred frames."""
    return max(frames - 1, 0) * audio.HOP / audio.SAMPLE_RATE
