"""`jaxtag serve` as a user starts it: a subprocess on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def jaxtag_serve(
    checkpoint: str | os.PathLike, *options: str, without: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """Runs `jaxtag serve --checkpoint CHECKPOINT --port 0 OPTIONS` until the block ends, then
    sends it Ctrl-C; yields (the base URL it printed, its first line). `without`: modules that
    the process cannot import (an install without them). The exit code and the rest of stderr
    are in `stopped` once the block has ended."""
    run = (
        "import sys\n"
        f"for name in {without!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ImportError\n"
        "from jaxtag.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", run, "serve", "--checkpoint", str(checkpoint), "--port", "0",
         *options],
        stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        line = process.stderr.readline()
        assert " on http://" in line, line + process.stderr.read()
        yield line.split(" on ", 1)[1].split()[0], line
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        stopped.update(returncode=process.returncode, stderr=err)


stopped: dict = {}  # the last server's exit code and stderr after its first line
