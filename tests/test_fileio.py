"""One writer per output: `fileio.exclusive_lock` refuses a second process at once, naming the
holder's PID, and is free again when the holder dies or finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxtag.fileio import LockedError, exclusive_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from jaxtag.fileio import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(target: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_second_writer_is_refused_naming_the_holder_until_it_dies(tmp_path, kind):
    target = tmp_path / ("out.csv" if kind == "file" else "workdir")
    if kind == "folder":
        target.mkdir()
    holder = _holder(target)
    try:
        with pytest.raises(LockedError) as refused:
            with exclusive_lock(target, "the output"):
                pass
        message = str(refused.value)
        assert f"PID {holder.pid}" in message and "the output" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead holder: the OS releases its lock
        holder.wait()
    with exclusive_lock(target) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()  # removed on a clean release
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ([] if kind == "file" else ["workdir"])  # no lock file left behind


def test_the_lock_is_reentrant_across_calls_and_removed_after(tmp_path):
    target = tmp_path / "out.npz"
    for _ in range(2):
        with exclusive_lock(target) as lock:
            assert lock.name == ".out.npz.lock" and lock.exists()
        assert not lock.exists()
    start = time.perf_counter()
    with exclusive_lock(target), pytest.raises(LockedError):  # the same process, a second time
        with exclusive_lock(target):
            pass
    assert time.perf_counter() - start < 5  # refused at once, not after waiting
