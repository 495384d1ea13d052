"""The released weights in one step: download, verify, convert and cache them.

`fetch()` downloads the released PyTorch weights (`ponswon.pth` of Won, Chun & Serra, 2019) into
`weights_dir()` and returns the file only once its git blob id matches the registry's; a cut
download resumes where it stopped. `converted_checkpoint()` converts that file once into a jaxtag
model checkpoint beside it and afterwards returns the cached directory without any network.

    ~/.cache/jaxtag/weights/ponswon.pth        the verified download ($JAXTAG_WEIGHTS_DIR)
    ~/.cache/jaxtag/weights/ponswon.pth.part   an unfinished download (resumed with a Range request)
    ~/.cache/jaxtag/weights/ponswon.pth.lock   held (flock) while a process downloads or converts
    ~/.cache/jaxtag/weights/ponswon/           the converted checkpoint

Every failure is a `DownloadError` whose one-line message names the URL or file and what to do,
including the manual way: download the URL by hand and put it at the final path, or pass the
file's path to `jaxtag.load` / `jaxtag convert`.

FOR TESTS ONLY: `$JAXTAG_TEST_RELEASED_URL` and `$JAXTAG_TEST_RELEASED_BLOB_ID` replace the
registry's URL and blob id. They are read at every call, so subprocesses (CLI tests) inherit them.
They exist so that tests can serve a generated file from a local server; nothing else should set
them.

Importing this module does not import JAX: only `converted_checkpoint` does, when it converts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from jaxtag.errors import JaxtagError
from jaxtag.runtime import user_cache_dir
from jaxtag.tags import MTAT_TOP50
from jaxtag.version import __version__

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent downloads there are not guarded
    fcntl = None

WEIGHTS_DIR_ENV = "JAXTAG_WEIGHTS_DIR"
TEST_URL_ENV = "JAXTAG_TEST_RELEASED_URL"  # tests only (module docstring)
TEST_BLOB_ID_ENV = "JAXTAG_TEST_RELEASED_BLOB_ID"  # tests only (module docstring)
TIMEOUT_S = 30.0  # per connect / per read: a dead network fails instead of hanging
BLOCK = 1 << 20


class DownloadError(JaxtagError):
    """The released weights could not be downloaded or verified (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ReleasedWeights:
    """A released PyTorch weights file and what converting it needs beyond its tensors."""

    name: str
    url: str
    blob_id: str  # git blob id (SHA-1 of b"blob <size>\0" + bytes): what GitHub itself names it
    filename: str = "ponswon.pth"
    num_heads: int = 8  # no tensor shape tells the head count
    tags: tuple[str, ...] = MTAT_TOP50


RELEASED: dict[str, ReleasedWeights] = {
    "ponswon": ReleasedWeights(
        name="ponswon",
        url="https://github.com/minzwon/self-attention-music-tagging/raw/master/models/ponswon.pth",
        blob_id="d5925c99ada6c4f5500a2546c8b62bec20f87d79",
    ),
}


def is_released_name(source: str) -> bool:
    """True when `source` names a registry entry (callers look for a path of that name first)."""
    return source in RELEASED


def released(name: str) -> ReleasedWeights:
    """The registry entry `name`, with the test overrides of the environment applied."""
    try:
        entry = RELEASED[name]
    except KeyError:
        known = ", ".join(sorted(RELEASED))
        raise JaxtagError(f"no released weights named {name!r} (known: {known})") from None
    return dataclasses.replace(
        entry,
        url=os.environ.get(TEST_URL_ENV) or entry.url,
        blob_id=os.environ.get(TEST_BLOB_ID_ENV) or entry.blob_id,
    )


def git_blob_id(path: str | os.PathLike) -> str:
    """The git blob id of a file (what `git hash-object FILE` prints), read in 1 MiB blocks."""
    with open(path, "rb") as file:
        digest = hashlib.sha1(b"blob %d\0" % os.fstat(file.fileno()).st_size)
        for block in iter(lambda: file.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_dir() -> Path:
    """Where released weights are cached: `$JAXTAG_WEIGHTS_DIR`, else `~/.cache/jaxtag/weights`."""
    chosen = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(os.path.expanduser(chosen)) if chosen else user_cache_dir() / "weights"


def _fallback(entry: ReleasedWeights, final: Path) -> str:
    return (
        f"download {entry.url} by hand and put it at {final}, or pass the file's path "
        f"(jaxtag.load('/path/to/{entry.filename}') / jaxtag convert /path/to/{entry.filename} OUT)"
    )


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, so that two processes never write one `.part`.

    The lock file stays: deleting it would let a third process lock a new inode while a second
    one still waits on the old.
    """
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def _fsync_dir(directory: Path) -> None:
    """Makes a rename durable (a crash must not lose the verified file's directory entry)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync directories; the rename itself is still atomic
    finally:
        os.close(fd)


def _looks_like_html(head: bytes) -> bool:
    start = head[:64].lstrip().lower()
    return start.startswith((b"<!doctype", b"<html"))


def _verify_existing(entry: ReleasedWeights, final: Path) -> Path:
    """A file already at the final path is used only if it is the released file; never deleted."""
    got = git_blob_id(final)
    if got != entry.blob_id:
        raise DownloadError(
            f"the file at {final} is not the released {entry.name} weights (git blob id {got}, "
            f"expected {entry.blob_id}); it was left in place: move it away and run again to "
            f"download the released file, or pass its own path to jaxtag.load / jaxtag convert"
        )
    return final


def _open(entry: ReleasedWeights, final: Path, offset: int) -> http.client.HTTPResponse | None:
    """The server's answer to a GET from byte `offset`; None when it answers 416 (no such range)."""
    headers = {"User-Agent": f"jaxtag/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(entry.url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return None
        raise DownloadError(
            f"{entry.url} answered HTTP {err.code} {_one_line(err.reason)}; "
            f"try again later, or {_fallback(entry, final)}"
        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = _one_line(getattr(err, "reason", None) or err)
        raise DownloadError(
            f"cannot reach {entry.url} ({reason}); check the network and run again, "
            f"or {_fallback(entry, final)}"
        ) from err


def _start(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None] | None:
    """(byte the body starts at, total size or None) of a 200/206 answer; None: restart at 0."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        # "bytes START-END/TOTAL": a range other than the one asked for is not appended
        unit, _, spec = (response.headers.get("Content-Range") or "").partition(" ")
        span, _, total = spec.partition("/")
        start = span.partition("-")[0]
        if unit != "bytes" or not start.isdigit() or int(start) != offset:
            return None
        total_size = int(total) if total.isdigit() else None
        if total_size is None and length is not None:
            total_size = offset + length
        return offset, total_size
    return 0, length  # 200: the server ignored the Range header, the body is the whole file


def _download(entry: ReleasedWeights, final: Path, part: Path, progress: bool) -> None:
    """Completes `part` (appending when the server honours Range) and verifies it, or raises."""
    offset = part.stat().st_size if part.exists() else 0
    response = _open(entry, final, offset)
    if response is None:  # 416: `part` already holds every byte (a crash before the rename?)
        if git_blob_id(part) == entry.blob_id:
            return
        part.unlink()
        offset, response = 0, _open(entry, final, 0)
    with response:
        if response.status not in (200, 206):
            raise DownloadError(
                f"{entry.url} answered HTTP {response.status}, not the file; "
                f"{_fallback(entry, final)}"
            )
        start = _start(response, offset)
        if start is None:
            if not offset:  # asked for the whole file, got a piece: nothing to resume from
                raise DownloadError(
                    f"{entry.url} answered a part of the file that was not asked for "
                    f"(Content-Range {response.headers.get('Content-Range')!r}); run again, "
                    f"or {_fallback(entry, final)}"
                )
            response.close()
            part.unlink(missing_ok=True)
            return _download(entry, final, part, progress)  # once more, from byte 0
        begin, total = start
        html_error = DownloadError(
            f"{entry.url} answered with an HTML page (a proxy or login page?), not the weights "
            f"file; {_fallback(entry, final)}"
        )
        if "text/html" in (response.headers.get("Content-Type") or "").lower():
            part.unlink(missing_ok=True)  # whatever it held, a fresh download starts at 0
            raise html_error
        written = begin
        bar = tqdm(
            total=total, initial=begin, desc=entry.filename, unit="B", unit_scale=True,
            unit_divisor=1024, disable=not progress, file=sys.stderr, leave=False,
        )  # fmt: skip
        with bar, open(part, "ab" if begin else "wb") as file:
            while True:
                try:
                    block = response.read(BLOCK)
                except (http.client.HTTPException, OSError) as err:  # reset, timeout, cut
                    file.flush()
                    os.fsync(file.fileno())
                    raise _cut(entry, final, part, written, total, err) from err
                if not block:
                    break
                if written == 0 and _looks_like_html(block):
                    file.close()
                    part.unlink()  # an HTML page is garbage: nothing of it can be resumed
                    raise html_error
                file.write(block)
                written += len(block)
                bar.update(len(block))
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the rename makes them final
    if total is not None and written < total:
        raise _cut(entry, final, part, written, total, None)
    got = git_blob_id(part)
    if got != entry.blob_id:
        part.unlink()
        raise DownloadError(
            f"the bytes downloaded from {entry.url} do not match the released file's git blob id "
            f"(expected {entry.blob_id}, got {got}); they were deleted: run again, or "
            f"{_fallback(entry, final)}"
        )


def _cut(
    entry: ReleasedWeights,
    final: Path,
    part: Path,
    written: int,
    total: int | None,
    err: BaseException | None,
) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    why = f" ({_one_line(type(err).__name__ + ': ' + str(err))})" if err is not None else ""
    return DownloadError(
        f"the download of {entry.url} was cut at {written}{of} bytes{why}; {part} was kept: "
        f"run again to resume, or {_fallback(entry, final)}"
    )


def _fetch_locked(entry: ReleasedWeights, directory: Path, progress: bool) -> Path:
    """`fetch` for a caller that holds the lock."""
    final = directory / entry.filename
    if final.exists():  # another process finished it while this one waited for the lock
        return _verify_existing(entry, final)
    part = directory / f"{entry.filename}.part"
    try:
        _download(entry, final, part, progress)
        os.replace(part, final)  # atomic: nothing sees a half-written or unverified final file
    except DownloadError:
        raise
    except OSError as err:  # disk full, permissions...
        raise DownloadError(
            f"cannot write {part}: {_one_line(err)}; free space or set ${WEIGHTS_DIR_ENV} to a "
            f"writable directory, or {_fallback(entry, final)}"
        ) from err
    _fsync_dir(directory)
    return final


def _prepare(entry: ReleasedWeights) -> Path:
    directory = weights_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(
            f"cannot create {directory}: {_one_line(err)}; set ${WEIGHTS_DIR_ENV} to a writable "
            f"directory, or {_fallback(entry, directory / entry.filename)}"
        ) from err
    return directory


def fetch(name: str = "ponswon", *, progress: bool = True) -> Path:
    """The path of the verified released `.pth` in `weights_dir()`, downloaded if needed.

    A file already there is checked, never replaced; a download resumes an existing `.part`.
    Raises DownloadError (one line) on any failure.
    """
    entry = released(name)
    directory = _prepare(entry)
    final = directory / entry.filename
    if final.exists():
        return _verify_existing(entry, final)
    with _locked(directory / f"{entry.filename}.lock"):
        return _fetch_locked(entry, directory, progress)


def _current(out: Path) -> bool:
    """A cached conversion in this jaxtag's checkpoint format."""
    from jaxtag import checkpoint  # imports JAX: only here, not on import

    if not checkpoint.is_model_dir(out):
        return False
    try:
        return checkpoint.read_meta(out).get(checkpoint.FORMAT_KEY) == checkpoint.FORMAT
    except Exception:  # unreadable: not current (and converted again)
        return False


def _older_conversion(out: Path) -> bool:
    """A cached conversion in an older checkpoint format (its metadata not under the digest)."""
    from jaxtag import checkpoint

    return checkpoint.is_model_dir(out) and not _current(out)


def converted_checkpoint(name: str = "ponswon", *, progress: bool = True) -> Path:
    """The jaxtag checkpoint directory converted from the released weights, cached at
    `weights_dir()/name`: returned without any network once it exists, else fetched and
    converted (under the download's lock, so concurrent callers convert once). A conversion in
    an older checkpoint format is made again from the cached `.pth`."""
    entry = released(name)
    out = weights_dir() / entry.name
    if _current(out):
        return out
    directory = _prepare(entry)
    with _locked(directory / f"{entry.filename}.lock"):
        if _current(out):  # converted by another process while this one waited
            return out
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif _older_conversion(out):  # converted by an older jaxtag: again, from the .pth
            pth = _fetch_locked(entry, directory, progress)
            from jaxtag.convert import convert_file

            kwargs = {"num_heads": entry.num_heads, "tags": list(entry.tags)}
            return convert_file(pth, out, overwrite=True, **kwargs)[0]
        elif out.exists():
            raise JaxtagError(
                f"{out} exists and is not a jaxtag checkpoint; move it away so that the "
                f"converted {entry.name} weights can be cached there"
            )
        pth = _fetch_locked(entry, directory, progress)
        from jaxtag.convert import convert_file

        path, _ = convert_file(pth, out, num_heads=entry.num_heads, tags=list(entry.tags))
    return path
