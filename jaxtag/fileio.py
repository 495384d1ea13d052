"""Writing files safely: atomic writes (a file whole or not at all), output checks before work,
and one writer per output (an exclusive advisory lock).

What the `jaxtag` commands rely on (jaxtag/cli/):

- `check_outputs` refuses, before any work, an output path that is a directory, a device or
  another non-regular file, in a folder that cannot be written, the same file as one of the
  inputs (compared by `os.stat` device and inode, so also through symbolic and hard links), or
  given twice. Whether an existing file is the writer's own is for the writer to judge
  (jaxtag/result_files.py, the commands' own checks) before it changes anything.
- `atomic_write` leaves the old file whole on any failure (disk full included) and no
  temporary file behind; its OSError names the file.
- `exclusive_lock` lets one process at a time write an output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from jaxtag.errors import JaxtagError


class OutputError(JaxtagError):
    """An output path that must not be written: a directory, an input, another program's file."""


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be written as a file, or None: it is a directory or another non-regular
    file, a read-only file, or the nearest existing folder on its way is a file or not writable.
    Commands check before their long work."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        if not path.is_file():
            return f"{path} is not a regular file (a device, a pipe or a socket)"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{path}: {parent} is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{path}: {parent} is not writable"
            break
    return None


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """`(st_dev, st_ino)` of the file that `path` names (links followed), None if there is none."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None
    return info.st_dev, info.st_ino


def check_outputs(
    outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Refuses output paths that must not be written, before any work (see the module docstring).

    Raises:
      OutputError: one line naming the output and what is wrong with it.
    """
    by_identity: dict[tuple[int, int], str] = {}
    for item in inputs:
        identity = file_identity(item)
        if identity is not None:
            by_identity.setdefault(identity, os.fspath(item))
    seen: dict[Any, str] = {}
    for output in outputs:
        name = os.fspath(output)
        problem = unwritable_reason(name)
        if problem:
            raise OutputError(problem)
        identity = file_identity(name)
        if identity in by_identity:
            raise OutputError(
                f"{name} is the input {by_identity[identity]} (the same file); writing it would "
                "destroy the input, so nothing was done: choose another output path"
            )
        key = identity or os.path.realpath(name)
        if key in seen:
            raise OutputError(f"{name} and {seen[key]} are the same file: give each output its own")
        seen[key] = name


def with_filename(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` with `path` as its file name when it has none (a failed write names no file)."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror or str(err), os.fspath(path))


def _file_mode(path: Path) -> int:
    """An existing file's permission bits, else a new file's (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file beside `path`; on a clean exit it replaces `path` in one rename.

    On an exception the temporary file is removed and `path` keeps its previous content; an
    OSError (a full disk...) names `path`. The parent directory is created if missing. `mode` is
    "w" (text) or "wb" (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give what open() would give
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = with_filename(err, path) if isinstance(err, OSError) else err
        if named is err:
            raise
        raise named from err


class LockedError(JaxtagError):
    """Another process is writing the same output (its PID is in the message)."""


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Holds an exclusive advisory lock on `target` (a file or a folder) for one writer at a time.

    The lock is a `.<name>.lock` file beside a file target, `.lock` inside a folder target,
    holding the owner's PID; the OS releases it when the process dies, and it is removed on a
    clean release. A second writer is refused at once (no waiting) with `LockedError` naming
    the holder's PID. `what` names the output in the message (default: the path).

    Raises:
      LockedError: another process holds the lock.
    """
    import fcntl

    target = Path(target)
    lock = target / ".lock" if target.is_dir() else target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{what or target} is being written by another process (PID {holder}); wait for "
                "it to finish or stop it, then run again"
            ) from None
        # The holder before us may have removed the lock file after we opened it: then we
        # locked a file nobody else sees. Start again on the one at the path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # unlink first: nobody can lock the removed file and think they own it
