"""Per-file result files that a rerun resumes: CSV and JSON-lines tables, and `.npz` arrays.

`jaxtag tag --csv/--jsonl/--taggram` and `jaxtag embed --out` write one record per audio file.
Each writer first reads what an earlier run with the same output left (`done()`: the files a
run then skips), then adds each record as soon as its file is scored:

- line files (CSV, JSONL) get one whole line per file, appended, flushed and fsync'ed; a kill
  can leave at most a torn last record, which the next run cuts off before appending.
- an `.npz` cannot be appended to: its records go to a sidecar `<OUT>.partial` (length-framed,
  appended the same way); `finish()` writes the whole `.npz` atomically, removes the sidecar.

Guarantees. Nothing in an existing file changes before `inspect()` has recognised it as this
writer's own: a CSV whose first line is `path,duration,<tags>`, JSON lines of `{"path",
"duration", "probabilities"}` records, an `.npz` or sidecar holding `paths`, `durations` and this
run's meta arrays; anything else is a `ResultFileError`, the file untouched. `locked()` holds
`fileio.exclusive_lock` on the file and its sidecar (the commands, for the whole run: a second
writer stops at once, naming the holder's PID); the commands check the paths before any work
(`fileio.check_outputs`). A file's key is its path as given or found in a directory, as the file
system has it: CSV rows are written and read with the `csv` module (newlines, carriage returns,
commas and quotes round-trip), and a name that is not UTF-8 (surrogate escapes, `os.fsdecode`)
is written back as its own bytes in the CSV, as JSON `\\udcXX` escapes and as the same str in
the `.npz`, so a rerun finds it again."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write, exclusive_lock, with_filename

ENCODING, ERRORS = "utf-8", "surrogateescape"  # names that are not UTF-8 keep their bytes


class ResultFileError(JaxtagError):
    """An existing output file that this run cannot continue (not jaxtag's, other columns...)."""


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where an `.npz` result keeps its records until the run finishes: `<OUT>.partial`."""
    return Path(path).with_name(Path(path).name + ".partial")


@dataclasses.dataclass
class Record:
    """What a run writes for one file: its whole-file vector and, optionally, its windows."""

    path: str
    duration: float  # seconds
    output: np.ndarray  # (D,) whole-file vector (tag probabilities or embedding)
    window_starts: np.ndarray | None = None  # (W,) seconds
    window_outputs: np.ndarray | None = None  # (W, D)


class ResultFile:
    """Interface of the writers: within `locked()`, `done()` (`inspect()`, then the file made
    ready to append), then `write(record)` per file, then `finish()`."""

    path: Path
    needs_windows: bool = False
    _keys: set[str] | None = None  # what `inspect()` found, until `done()` uses it

    def targets(self) -> list[Path]:
        """The files this writer writes, each locked by `locked()`."""
        return [self.path]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds `fileio.exclusive_lock` on every target; LockedError if another process does."""
        with contextlib.ExitStack() as stack:
            for target in self.targets():
                stack.enter_context(exclusive_lock(target))
            yield

    def inspect(self) -> set[str]:
        """The files an earlier run wrote, read without changing anything; ResultFileError if
        the existing file is not this writer's, or not this run's."""
        raise NotImplementedError

    def done(self) -> set[str]:
        """`inspect()` (unless just called), then the file made ready to append."""
        keys = self.inspect() if self._keys is None else self._keys
        self._keys = None
        self._prepare()
        return keys

    def _prepare(self) -> None:
        raise NotImplementedError

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last record of a run that was not interrupted."""


def _append_durably(path: Path, data: bytes) -> None:
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise with_filename(err, path) from err


def _cut_torn_tail(path: Path, keep: int, size: int) -> None:
    """Drops the bytes of `path` after `keep` (a record that a kill left half-written)."""
    if keep < size:
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def _not_ours(path: Path, what: str) -> ResultFileError:
    return ResultFileError(f"{path}: {what}, so it was left untouched; write to another file")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ResultFileError(f"{path}: cannot read it ({err.strerror or err})") from err


class _LineFile(ResultFile):
    """One line per file; subclasses say how a line is made and how the text is parsed."""

    def __init__(self, path: str | os.PathLike, tags: list[str]):
        self.path = Path(path)
        self.tags = list(tags)
        self._state = (0, 0)  # (bytes to keep, size) once inspected

    def header(self) -> str:
        return ""

    def line(self, record: Record) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[set[str], int]:
        """The keys of the whole records in `text` and the length of the text they take (what
        follows is a torn record); ResultFileError if `text` is not this writer's."""
        raise NotImplementedError

    def inspect(self) -> set[str]:
        data = _read(self.path) if self.path.exists() else b""
        text = data.decode(ENCODING, ERRORS)  # every byte kept, so offsets map back exactly
        self._keys, keep = self.parse(text) if data else (set(), 0)
        self._state = (len(text[:keep].encode(ENCODING, ERRORS)), len(data))
        return self._keys

    def _prepare(self) -> None:
        keep, size = self._state
        if size == 0:
            with atomic_write(self.path, "wb") as f:
                f.write(self.header().encode(ENCODING, ERRORS))
        else:
            _cut_torn_tail(self.path, keep, size)

    def write(self, record: Record) -> None:
        _append_durably(self.path, self.line(record).encode(ENCODING, ERRORS))


def _csv_rows(text: str, path: Path) -> list[tuple[list[str], int]]:
    """Every row of `text` with the offset where it ends, parsed by the csv module (a quoted
    field may hold newlines); a record torn inside its quotes at the end is left out."""
    lines, consumed = re.findall(r"[^\n]*\n|[^\n]+\Z", text), 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for line in lines:
            consumed += len(line)
            yield line

    reader, rows = csv.reader(feed(), strict=True), []
    while True:
        try:
            rows.append((next(reader), consumed))
        except StopIteration:
            return rows
        except csv.Error as err:
            if consumed < len(text):  # not the torn last record: a line that is not CSV
                raise _not_ours(path, f"row {len(rows) + 1} is not CSV ({err})") from err
            return rows


def _csv_line(row: list[str]) -> str:
    """One CSV row ending in "\n". The "\r\n" terminator makes the writer quote a field with
    a "\r" as well as one with a "\n" (it quotes the terminator's characters)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(row)
    return buffer.getvalue()[:-2] + "\n"


class CsvFile(_LineFile):
    """`path,duration,<tag>,<tag>...` with one row per file (6-decimal probabilities)."""

    def header(self) -> str:
        return _csv_line(["path", "duration", *self.tags])

    def line(self, record: Record) -> str:
        values = [f"{p:.6f}" for p in record.output]
        return _csv_line([record.path, f"{record.duration:.3f}", *values])

    def parse(self, text: str) -> tuple[set[str], int]:
        rows = _csv_rows(text, self.path)
        if not rows or rows[0][0][:2] != ["path", "duration"] or text[rows[0][1] - 1] != "\n":
            raise _not_ours(self.path, "not a jaxtag table (no path,duration,<tags> header)")
        if rows[0][0] != ["path", "duration", *self.tags]:
            raise ResultFileError(
                f"{self.path}: its header is not this run's (path, duration and the "
                f"checkpoint's {len(self.tags)} tags); write to another file or remove it"
            )
        keys, keep = set(), rows[0][1]
        for number, (row, end) in enumerate(rows[1:], start=2):
            whole = text[end - 1] == "\n"
            if whole and (not row or len(row) == len(self.tags) + 2):
                if row:  # (a blank line is skipped)
                    keys.add(row[0])
                keep = end
            elif not whole:  # only the last row can end without a newline: torn, cut off
                break
            else:
                raise ResultFileError(
                    f"{self.path}: row {number} has {len(row)} fields, not "
                    f"{len(self.tags) + 2}: {text[keep:end][:80]!r}"
                )
        return keys, keep


JSON_PREFIX = '{"path": '  # how every record line starts (json.dumps of the dict below)


class JsonlFile(_LineFile):
    """`{"path": ..., "duration": ..., "probabilities": {tag: p, ...}}` per line."""

    def line(self, record: Record) -> str:
        probabilities = {
            t: round(float(p), 6) for t, p in zip(self.tags, record.output, strict=True)
        }
        item = {"path": record.path, "duration": round(record.duration, 3)}
        # ensure_ascii: control characters and surrogates become \u escapes, one ASCII line
        return json.dumps({**item, "probabilities": probabilities}, allow_nan=False) + "\n"

    def parse(self, text: str) -> tuple[set[str], int]:
        *lines, tail = text.split("\n")
        keys, keep = set(), 0
        for number, line in enumerate(lines, start=1):
            if line:
                keys.add(self._key(line, number))
            keep += len(line) + 1
        if tail and not keys and not (tail.startswith(JSON_PREFIX) or JSON_PREFIX.startswith(tail)):
            raise _not_ours(self.path, f"not jaxtag JSON lines (no {JSON_PREFIX}... record)")
        return keys, keep

    def _key(self, line: str, number: int) -> str:
        try:
            item = json.loads(line)
            path, tags, _ = item["path"], list(item["probabilities"].keys()), item["duration"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # not a dict...
            raise _not_ours(self.path, f"line {number} is no jaxtag record {line[:50]!r}") from err
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
    if not data.startswith(b"PK"):  # np.load would take other bytes for a pickle
        raise ValueError("not a zip archive")
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
        self.partial = sidecar_path(self.path)
        self.file_key, self.window_key = file_key, window_key
        self.needs_windows = window_key is not None
        self.window_seconds = window_seconds
        self.meta = {k: np.asarray(v) for k, v in meta.items()}
        self.meta["has_windows"] = np.asarray(self.needs_windows)
        self._earlier: list[Record] = []
        self._sidecar: tuple[int, int] | None = None  # (bytes to keep, size) once inspected

    def _check_meta(self, arrays: dict[str, np.ndarray], source: Path) -> None:
        for name, value in self.meta.items():
            if name not in arrays or not np.array_equal(arrays[name], value):
                raise ResultFileError(
                    f"{source}: written by another run ({name} differs: "
                    f"{arrays.get(name)!s:.60} vs {value!s:.60}); write to another file or "
                    "remove it"
                )

    def targets(self) -> list[Path]:
        return [self.path, self.partial]

    def inspect(self) -> set[str]:
        self._earlier, self._sidecar = [], None
        if self.path.exists():
            try:
                arrays = _npz_arrays(_read(self.path))
            except (ValueError, OSError, EOFError) as err:
                raise _not_ours(self.path, f"not a readable .npz ({err})") from err
            missing = {"paths", "durations", self.file_key} - set(arrays)
            if missing:
                raise _not_ours(self.path, f"not a jaxtag .npz (no {', '.join(sorted(missing))})")
            self._check_meta(arrays, self.path)
            self._earlier += self._split(arrays)
        if self.partial.exists():
            data = _read(self.partial)
            frames, position = self._parse_frames(data)
            if not frames:
                raise _not_ours(self.partial, "not a jaxtag sidecar")
            self._check_meta(frames[0], self.partial)
            self._earlier += [self._record(arrays) for arrays in frames[1:]]
            self._sidecar = (position, len(data))
        self._keys = {record.path for record in self._earlier}
        return self._keys

    def _prepare(self) -> None:
        if self._sidecar is None:
            with atomic_write(self.partial, "wb") as f:
                f.write(self._frame(self.meta))
        else:
            _cut_torn_tail(self.partial, *self._sidecar)

    @staticmethod
    def _frame(arrays: dict[str, np.ndarray]) -> bytes:
        payload = _npz_bytes(arrays)
        return _FRAME.pack(_MAGIC, len(payload)) + payload

    @staticmethod
    def _parse_frames(data: bytes) -> tuple[list[dict[str, np.ndarray]], int]:
        """The whole frames of sidecar bytes and where they end (a torn frame may follow)."""
        frames, position = [], 0
        while position + _FRAME.size <= len(data):
            magic, length = _FRAME.unpack_from(data, position)
            end = position + _FRAME.size + length
            if magic != _MAGIC or end > len(data):
                break
            try:
                frames.append(_npz_arrays(data[position + _FRAME.size : end]))
            except (ValueError, OSError, EOFError):
                break
            position = end
        return frames, position

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
        records = self._earlier + [
            self._record(a) for a in self._parse_frames(_read(self.partial))[0][1:]
        ]
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
