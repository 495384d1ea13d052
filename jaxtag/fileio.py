"""Atomic file writes: the one helper every stage uses to write a file whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be written as a file, or None: it is a directory, or the nearest existing
    folder on its way is a file or not writable. Commands check before their long work."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{path}: {parent} is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{path}: {parent} is not writable"
            break
    return None


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

    On an exception the temporary file is removed and `path` keeps its previous content. The
    parent directory is created if missing. `mode` is "w" (text) or "wb" (bytes).
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
