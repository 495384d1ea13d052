"""Ctrl-C in the command shells: SIGINT as a KeyboardInterrupt that is never lost.

Python prints and drops a KeyboardInterrupt raised inside a garbage-collector callback (JAX has
one), a weakref callback or a `__del__`: caught there (`sys.unraisablehook`), it is raised again a
moment later, outside. `INTERRUPTED` tells a command that a library turned Ctrl-C into an error
of its own (pybind11 does during an import). `jaxtag`, `jaxtag-train`, `jaxtag-eval` and
`jaxtag-build` run inside `sigint_handled()`.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

_HANDLING = threading.Event()  # set while `main` handles SIGINT (a retry after it returned: none)
INTERRUPTED = threading.Event()  # SIGINT came during this `main` (see common.guarded)
RETRY_SECONDS = 0.05


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _retry_interrupt() -> None:
    if _HANDLING.is_set():
        _thread.interrupt_main()  # calls _on_sigint again, in the main thread


def _unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` under which a KeyboardInterrupt that Python would print and drop
    (raised in a gc callback, a weakref callback, a `__del__`) is raised again a moment later."""

    def hook(unraisable: Any) -> None:
        if _HANDLING.is_set() and issubclass(unraisable.exc_type, KeyboardInterrupt):
            timer = threading.Timer(RETRY_SECONDS, _retry_interrupt)
            timer.daemon = True
            timer.start()
        else:
            previous(unraisable)

    return hook


@contextlib.contextmanager
def sigint_handled() -> Iterator[None]:
    """SIGINT as KeyboardInterrupt, never lost in a finaliser (see the module docstring); only in
    the main thread, and not where SIGINT is ignored (a background job)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    _HANDLING.set()
    try:
        yield
    finally:
        _HANDLING.clear()
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)


def exit_now(code: int) -> None:
    """Ends an interrupted command at once, its one line already printed: finalising the
    interpreter while JAX's or onnxruntime's threads were stopped in mid-work crashed it once in
    a while (SIGSEGV after the message), and a thread caught by the exit could start printing a
    traceback (seen under load in tests/test_writer_failures.py), so stderr is closed first.
    What the command wrote is already whole on disk."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os._exit(code)
