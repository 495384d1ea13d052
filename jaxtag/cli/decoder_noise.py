"""Keeps the audio decoders' own chatter off the terminal while a command decodes.

libmpg123 (inside libsndfile) prints "Note: Illegal Audio-MPEG-Header ... Trying to resync"
and "[src/libmpg123/...] error: ..." lines straight to file descriptor 2 for every damaged
frame of an mp3, around jaxtag's own messages (a file that cannot be decoded at all is reported
by jaxtag in one line anyway; a file with a few damaged frames decodes and is tagged). While
`filtered()` is active, descriptor 2 is a pipe read by a thread that drops those lines and
passes everything else on, in order, to the real stderr: Python's writes go through the same
pipe, so nothing is reordered; a partial line (a progress bar's redraw) is passed on at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import threading
from collections.abc import Iterator

# What libmpg123 prints for damaged frames (mpg123's "Note:"/"Warning:" notices and its
# "[src/libmpg123/file.c:function():line] error:" reports).
NOISE = re.compile(rb"^(?:Note: |Warning: |\[src/libmpg123/)")
FLUSH_SECONDS = 0.05  # a partial line waits this long for its end before it is passed on


def _forward(read_fd: int, write_fd: int) -> None:
    pending = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], FLUSH_SECONDS)
        if not ready:  # quiet for a moment: a partial line (a progress bar) goes out as it is
            if pending:
                os.write(write_fd, pending)
                pending = b""
            continue
        data = os.read(read_fd, 65536)
        if not data:
            break
        pending += data
        *lines, pending = re.split(rb"(?<=[\n\r])", pending)
        kept = b"".join(line for line in lines if not NOISE.match(line))
        if kept:
            os.write(write_fd, kept)
    if pending and not NOISE.match(pending):
        os.write(write_fd, pending)


@contextlib.contextmanager
def filtered() -> Iterator[None]:
    """Descriptor 2 through the filter above for the duration (a no-op where stderr has no
    descriptor, as under a test's capture)."""
    try:
        sys.stderr.flush()
        if sys.stderr.fileno() != 2:
            raise ValueError
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closed: the thread reads to its end
        thread.join(timeout=5)
        os.close(read_fd)
        os.close(saved)
