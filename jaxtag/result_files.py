"""Per-file result files that a rerun resumes: CSV and JSON-lines tables, and `.npz` arrays.

`jaxtag tag --csv/--jsonl/--taggram` and `jaxtag embed --out` write one record per audio file.
Each writer first reads what an earlier run with the same output left (`done()` names those
files, which the run then skips) and afterwards adds each record as soon as its file is scored:

- line files (CSV, JSONL) get one whole line per file, appended, flushed and fsync'ed; the only
  damage a kill can do is a torn last line, which the next run finds (no final newline) and cuts
  off before appending. The CSV header is written with `fileio.atomic_write`.
- an `.npz` cannot be appended to, so its records go to a sidecar `<OUT>.partial` (length-framed,
  appended and fsync'ed the same way, a torn last frame is cut off); `finish()` writes the whole
  `.npz` (earlier contents plus the sidecar) with `fileio.atomic_write` and removes the sidecar.

A file's key is its path as given on the command line or found in a directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import struct
from pathlib import Path

import numpy as np

from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write


class ResultFileError(JaxtagError):
    """An existing output file that this run cannot continue (other columns, other model...)."""


@dataclasses.dataclass
class Record:
    """What a run writes for one file: its whole-file vector and, optionally, its windows."""

    path: str
    duration: float  # seconds
    output: np.ndarray  # (D,) whole-file vector (tag probabilities or embedding)
    window_starts: np.ndarray | None = None  # (W,) seconds
    window_outputs: np.ndarray | None = None  # (W, D)


class ResultFile:
    """Interface of the writers: `done()`, then `write(record)` per file, then `finish()`."""

    path: Path
    needs_windows: bool = False

    def done(self) -> set[str]:
        raise NotImplementedError

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last record of a run that was not interrupted."""


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _cut_torn_tail(path: Path, keep: int, size: int) -> None:
    """Drops the bytes of `path` after `keep` (a record that a kill left half-written)."""
    if keep < size:
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


class _LineFile(ResultFile):
    """One line per file; subclasses say how a line is made and which path a line holds."""

    def __init__(self, path: str | os.PathLike, tags: list[str]):
        self.path = Path(path)
        self.tags = list(tags)

    def header(self) -> str | None:
        return None

    def line(self, record: Record) -> str:
        raise NotImplementedError

    def key(self, line: str) -> str:
        """The path a complete line holds; ResultFileError if the line is not this run's kind."""
        raise NotImplementedError

    def done(self) -> set[str]:
        header = self.header()
        if not self.path.exists() or self.path.stat().st_size == 0:
            with atomic_write(self.path, "w", encoding="utf-8", newline="") as f:
                f.write(header or "")
            return set()
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # whole lines only
        _cut_torn_tail(self.path, keep, len(data))
        lines = data[:keep].decode("utf-8").split("\n")[:-1]
        if header is not None:
            if not lines or lines[0] + "\n" != header:
                raise ResultFileError(
                    f"{self.path}: its header is not this run's (path, duration and the "
                    f"checkpoint's {len(self.tags)} tags); write to another file or remove it"
                )
            lines = lines[1:]
        return {self.key(line) for line in lines if line}

    def write(self, record: Record) -> None:
        _append_durably(self.path, self.line(record).encode("utf-8"))


class CsvFile(_LineFile):
    """`path,duration,<tag>,<tag>...` with one row per file (6-decimal probabilities)."""

    def _format(self, row: list) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row)
        return buffer.getvalue()

    def header(self) -> str:
        return self._format(["path", "duration", *self.tags])

    def line(self, record: Record) -> str:
        values = [f"{p:.6f}" for p in record.output]
        return self._format([record.path, f"{record.duration:.3f}", *values])

    def key(self, line: str) -> str:
        row = next(csv.reader([line]))
        if len(row) != len(self.tags) + 2:
            raise ResultFileError(f"{self.path}: a row with {len(row)} fields: {line[:80]!r}")
        return row[0]


class JsonlFile(_LineFile):
    """`{"path": ..., "duration": ..., "probabilities": {tag: p, ...}}` per line."""

    def line(self, record: Record) -> str:
        probabilities = {
            t: round(float(p), 6) for t, p in zip(self.tags, record.output, strict=True)
        }
        item = {"path": record.path, "duration": round(record.duration, 3)}
        return json.dumps({**item, "probabilities": probabilities}, allow_nan=False) + "\n"

    def key(self, line: str) -> str:
        try:
            item = json.loads(line)
            path, tags = item["path"], list(item["probabilities"])
        except (ValueError, KeyError, TypeError) as err:
            raise ResultFileError(f"{self.path}: not a jaxtag tag record: {line[:80]!r}") from err
        if tags != self.tags:
            raise ResultFileError(
                f"{self.path}: written with other tags than the checkpoint's; "
                "write to another file or remove it"
            )
        return path


_FRAME = struct.Struct("<4sQ")  # magic, payload length
_MAGIC = b"JXTG"


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class NpzFile(ResultFile):
    """All files' vectors in one `.npz`, windows optional.

    Holds `paths` (N,), `durations` (N,) and `<file_key>` (N, D) float32; with windows also
    `<window_key>` (W, D) float32, `window_starts` (W,) seconds, `window_file_index` (W,) (the row
    of `paths` each window belongs to) and `window_seconds`; plus the `meta` arrays given (the tag
    names, the representation...), which a resumed run must match.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        file_key: str,
        meta: dict[str, np.ndarray],
        window_key: str | None = None,
        window_seconds: float = 0.0,
    ):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.file_key, self.window_key = file_key, window_key
        self.needs_windows = window_key is not None
        self.window_seconds = window_seconds
        self.meta = {k: np.asarray(v) for k, v in meta.items()}
        self.meta["has_windows"] = np.asarray(self.needs_windows)
        self._earlier: list[Record] = []

    def _check_meta(self, arrays: dict[str, np.ndarray], source: Path) -> None:
        for name, value in self.meta.items():
            if name not in arrays or not np.array_equal(arrays[name], value):
                raise ResultFileError(
                    f"{source}: written by another run ({name} differs: "
                    f"{arrays.get(name)!s:.60} vs {value!s:.60}); write to another file or "
                    "remove it"
                )

    def done(self) -> set[str]:
        self._earlier = []
        if self.path.exists():
            try:
                arrays = _npz_arrays(self.path.read_bytes())
            except (ValueError, OSError) as err:
                raise ResultFileError(f"{self.path}: not a readable .npz ({err})") from err
            self._check_meta(arrays, self.path)
            self._earlier += self._split(arrays)
        if not self.partial.exists():
            with atomic_write(self.partial, "wb") as f:
                f.write(self._frame(self.meta))
        else:
            frames = self._read_frames()
            if not frames:
                raise ResultFileError(f"{self.partial}: not a jaxtag sidecar; remove it")
            self._check_meta(frames[0], self.partial)
            self._earlier += [self._record(arrays) for arrays in frames[1:]]
        return {record.path for record in self._earlier}

    @staticmethod
    def _frame(arrays: dict[str, np.ndarray]) -> bytes:
        payload = _npz_bytes(arrays)
        return _FRAME.pack(_MAGIC, len(payload)) + payload

    def _read_frames(self) -> list[dict[str, np.ndarray]]:
        data = self.partial.read_bytes()
        frames, position = [], 0
        while position + _FRAME.size <= len(data):
            magic, length = _FRAME.unpack_from(data, position)
            end = position + _FRAME.size + length
            if magic != _MAGIC or end > len(data):
                break
            try:
                frames.append(_npz_arrays(data[position + _FRAME.size : end]))
            except (ValueError, OSError):
                break
            position = end
        _cut_torn_tail(self.partial, position, len(data))
        return frames

    def write(self, record: Record) -> None:
        arrays = {
            "path": np.asarray(record.path),
            "duration": np.asarray(record.duration),
            "output": np.asarray(record.output, np.float32),
        }
        if self.needs_windows:
            arrays["window_starts"] = np.asarray(record.window_starts, np.float64)
            arrays["window_outputs"] = np.asarray(record.window_outputs, np.float32)
        _append_durably(self.partial, self._frame(arrays))

    @staticmethod
    def _record(arrays: dict[str, np.ndarray]) -> Record:
        return Record(
            str(arrays["path"]),
            float(arrays["duration"]),
            arrays["output"],
            arrays.get("window_starts"),
            arrays.get("window_outputs"),
        )

    def _split(self, arrays: dict[str, np.ndarray]) -> list[Record]:
        records = []
        for i, path in enumerate(arrays["paths"]):
            record = Record(str(path), float(arrays["durations"][i]), arrays[self.file_key][i])
            if self.needs_windows:
                rows = arrays["window_file_index"] == i
                record.window_starts = arrays["window_starts"][rows]
                record.window_outputs = arrays[self.window_key][rows]
            records.append(record)
        return records

    def finish(self) -> None:
        records = self._earlier + [self._record(a) for a in self._read_frames()[1:]]
        seen, unique = set(), []
        for record in records:  # a file in both the old .npz and the sidecar: keep the first
            if record.path not in seen:
                seen.add(record.path)
                unique.append(record)
        width = len(unique[0].output) if unique else 0
        arrays = {
            **self.meta,
            "paths": np.asarray([r.path for r in unique], dtype=str),
            "durations": np.asarray([r.duration for r in unique], np.float64),
            self.file_key: np.asarray([r.output for r in unique], np.float32).reshape(-1, width),
        }
        if self.needs_windows:
            windows = [r.window_outputs for r in unique]
            arrays[self.window_key] = (
                np.concatenate(windows).astype(np.float32) if unique else np.zeros((0, 0))
            )
            arrays["window_starts"] = np.concatenate(
                [r.window_starts for r in unique] or [np.zeros(0)]
            ).astype(np.float64)
            arrays["window_file_index"] = np.concatenate(
                [np.full(len(w), i, np.int64) for i, w in enumerate(windows)] or [np.zeros(0)]
            ).astype(np.int64)
            arrays["window_seconds"] = np.asarray(self.window_seconds)
        with atomic_write(self.path, "wb") as f:
            np.savez(f, **arrays)
        self.partial.unlink()
        self._earlier = unique
