"""The `.pth` reader's limits (jaxtag/torch_file.py) against hostile files of a few KB each.

Each file claims far more than it holds (a record inflating to 64 MiB, a stride-0 view of 4 TiB,
10**9 references to one tensor, 50,000 nested lists, a memo index of 2**32): it must be refused
in one line naming it, fast, without taking memory (tracemalloc counts every allocation asked for,
even one never touched). The slow test measures full-size cases' peak RSS in subprocesses. Files
are written by tests/pth_writer.py, without torch; legitimate ones still read exactly, within the
result plus twice their largest tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxtag import torch_file
from jaxtag.torch_file import TorchFileError
from tests import pth_writer as w

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zip", "legacy"]
PEAK = 16 << 20  # bytes a refusal may allocate: the pickles are KB (a legacy read window 8 MiB)
SECONDS = 1.0  # a refusal's wall time (they take milliseconds)


class Overtime(BaseException):
    """Raised into a load that runs past its deadline (a BaseException: no handler hides it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def expire(signum, frame):
        raise Overtime(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measured_load(path: Path, trace: bool = True):
    """(what torch_file.load(path) returns or raises, seconds, peak bytes allocated if `trace`)."""
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with deadline(10):
            try:
                result = torch_file.load(path)
            except TorchFileError as err:
                result = err
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        return result, time.perf_counter() - start, peak
    finally:
        tracemalloc.stop()


def refused(path: Path, pattern: str) -> str:
    """Checks that `path` is refused in one line naming it, fast and without memory."""
    err, seconds, _ = measured_load(path, trace=False)  # timed without tracemalloc's overhead
    assert isinstance(err, TorchFileError), f"not refused: {type(err).__name__}"
    message = str(err)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400
    assert re.search(pattern, message), message
    assert seconds < SECONDS, seconds
    again, _, peak = measured_load(path)
    assert str(again) == message and peak < PEAK, f"{peak / 2**20:.1f} MiB allocated"
    return message


# ----------------------------------------------------------------------------------------------
# Zip records: read up to their storage's declared size, never more


def test_record_larger_than_its_storage_is_not_inflated(tmp_path):
    path = w.write_zip_bomb(tmp_path / "bomb.pth", inflated=64 << 20, numel=1)  # 64 KiB file
    assert path.stat().st_size < 100_000
    refused(path, r"record archive/data/0 holds 67108864 bytes, not its storage's 4 .*not read")


def test_record_inflating_to_its_declared_storage_is_a_bomb(tmp_path):
    path = w.write_zip_bomb(tmp_path / "bomb.pth", inflated=64 << 20, numel=16 << 20)
    refused(path, r"record archive/data/0 inflates 10\d\d:1 to 67108864 bytes \(over 100:1")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_bzip2_and_lzma_records_are_refused_unread(tmp_path, method):
    """Their decompressors take no output limit: one 4 KiB read could inflate to gigabytes."""
    numel = 4 << 20  # 16 MiB of zeros: bzip2 makes 138 bytes of it, lzma 2.5 KB
    data = w.one_entry("w", w.tensor_opcodes("0", w.FLOAT, numel, 0, (numel,), (1,)))
    storages = {"0": (numel, bytes(4 * numel))}
    path = w.write_raw_pth(tmp_path / "b.pth", data, storages, "zip", compression=method)
    refused(path, f"record archive/data/0 is compressed with zip method {method}: only stored")


def test_legit_zip_reads_exactly_within_twice_its_largest_tensor(tmp_path):
    rng = np.random.default_rng(0)  # weights, which deflate to ~90 % (zeros would be a bomb)
    state = {f"layer{i}.weight": rng.normal(size=(1024, 1024)).astype(np.float32) for i in range(8)}
    state |= {"bias": np.arange(7, dtype=np.int64), "scalar": np.array(2.5), "empty": np.zeros(0)}
    deflated = w.write_pth(tmp_path / "d.pth", state, "zip", zipfile.ZIP_DEFLATED)  # re-zipped
    total, largest = sum(v.nbytes for v in state.values()), 4 << 20
    for path in (w.write_pth(tmp_path / "z.pth", state, "zip"), deflated):
        got, seconds, peak = measured_load(path)
        assert list(got) == list(state)
        for key, value in state.items():
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert peak < total + 2 * largest + (1 << 20), f"{peak / 2**20:.1f} MiB for 32 MiB"


def test_legit_legacy_reads_within_twice_its_largest_tensor(tmp_path):
    state = {f"layer{i}.weight": np.full((1024, 1024), -i, np.float32) for i in range(8)}
    got, seconds, peak = measured_load(w.write_pth(tmp_path / "l.pth", state, "legacy"))
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert peak < 32 * 2**20 + 2 * 4 * 2**20 + (1 << 20), f"{peak / 2**20:.1f} MiB for 32 MiB"


# ----------------------------------------------------------------------------------------------
# Tensor views: inside their storage, never larger than it


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [(4096, 4096), (1 << 20, 1 << 20)], ids=["64MiB", "4TiB"])
def test_stride_zero_view_is_not_expanded(tmp_path, fmt, size):
    path = w.write_strided(tmp_path / "s.pth", size, (0, 0), numel=1, fmt=fmt)
    assert path.stat().st_size < 2000
    refused(path, rf"size \[{size[0]}, {size[1]}\] .*stride \[0, 0\]\) has more elements than its")


def test_legacy_storage_views_stay_inside_their_root(tmp_path):
    """Views of elements [4, 14) (refused: it was read as the [4, 6) the file holds) and [2, 6)
    (read) of a 6-element storage."""
    raw = {"0": (6, np.arange(6, dtype="<f4").tobytes())}
    for view, offset, stride in ((4, 10), 0, 1), ((2, 4), 1, 2):
        tensor = w.tensor_opcodes("0", w.FLOAT, 6, offset, (2,), (stride,), True, view=view)
        w.write_raw_pth(tmp_path / f"{view}.pth", w.one_entry("w", tensor), raw, "legacy")
    refused(tmp_path / "(4, 10).pth", "a view of storage 0 reaches past its 6")
    got = torch_file.load(tmp_path / "(2, 4).pth")["w"]  # [0..5] -> view [2..5] -> 1::2
    np.testing.assert_array_equal(got, np.float32([3, 5]))
    tensor = w.tensor_opcodes("0", w.FLOAT, 6, 0, (2, 3), (0, 1))  # stride 0, within its storage
    path = w.write_raw_pth(tmp_path / "s.pth", w.one_entry("w", tensor), raw, "zip")
    assert torch_file.load(path)["w"].tolist() == [[0, 1, 2], [0, 1, 2]]


# ----------------------------------------------------------------------------------------------
# Pickles: shared references, nesting, memo, opcodes, allow-listed objects


@pytest.mark.parametrize("fmt", FORMATS)
def test_billion_laughs(tmp_path, fmt):
    path = w.write_billion_laughs(tmp_path / "laughs.pth", levels=9, width=10, fmt=fmt)
    assert path.stat().st_size < 2000  # 10**9 references to one tensor
    refused(path, r"objects of over 4194304 entries when shared references are counted")


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_references_stay_shared(tmp_path, fmt):
    got, _, _ = measured_load(w.write_billion_laughs(tmp_path / "s.pth", 3, 4, fmt=fmt))
    outer = got["w"]  # [L2] * 4, L2 = [L1] * 4, L1 = [tensor] * 4: one object each
    assert len(outer) == 4 and all(inner is outer[0] for inner in outer)
    assert all(inner is outer[0][0] for inner in outer[0])
    tensors = outer[0][0]
    assert all(t is tensors[0] for t in tensors) and tensors[0].tolist() == [0.0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "write, pattern",
    [
        (lambda p, fmt: w.write_deep(p, 50_000, fmt), "nested more than 64 deep"),
        (lambda p, fmt: w.write_deep_by_mutation(p, 1000, fmt), r"nested over 64 deep \(or a"),
        (lambda p, fmt: w.write_cycle(p, fmt), r"nested over 64 deep \(or a cycle\)"),
        (lambda p, fmt: w.write_deep_tuple_key(p, 1000, fmt), "nested more than 64 deep"),
    ],
    ids=["appended", "by-mutation", "cycle", "tuple-key"],
)
def test_deep_nesting_is_refused_in_one_line(tmp_path, fmt, write, pattern):
    refused(write(tmp_path / "deep.pth", fmt), pattern)


@pytest.mark.parametrize("fmt", FORMATS)
def test_memo_index_skipping_ahead(tmp_path, fmt):
    """LONG_BINPUT 2**32 - 1 would make the C unpickler allocate 2**33 memo slots (64 GiB)."""
    path = w.write_memo_index(tmp_path / "memo.pth", (1 << 32) - 1, fmt)
    refused(path, "pickle memo index 4294967295 skips ahead")


def test_pickle_opcode_limit(tmp_path):
    refused(w.write_many_opcodes(tmp_path / "n.pth", 1 << 16), "more than 65536 opcodes")
    got = torch_file.load(w.write_many_opcodes(tmp_path / "ok.pth", 1000))
    assert got == {"w": [None] * 1000}


@pytest.mark.parametrize("fmt", FORMATS)
def test_ordered_dict_copies_of_one_shared_list(tmp_path, fmt):
    """2,000 calls OrderedDict(items) on one list of 1,000 pairs: 2 million entries from 60 KB."""
    path = w.write_ordered_dict_copies(tmp_path / "od.pth", 1000, 2000, fmt)
    refused(path, r"OrderedDict\(...\) calls copy more entries than the pickle has opcodes")
    small = torch_file.load(w.write_ordered_dict_copies(tmp_path / "small.pth", 3, 2, fmt))
    assert small == {"w": [{0: 0, 1: 1, 2: 2}] * 2}  # Python 2 pickles pass their pairs so


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_state_is_not_copied_into_ordered_dicts(tmp_path, fmt):
    """torch BUILDs `_metadata` into a state dict; 2,000 BUILDs of one 1,000-entry dict here."""
    got, seconds, peak = measured_load(w.write_build_copies(tmp_path / "b.pth", 1000, 2000, fmt))
    assert got == {"w": [{}] * 2000}
    assert peak < PEAK, f"{peak / 2**20:.1f} MiB allocated"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "module, name", [("torch", "FloatStorage"), ("torch._utils", "_rebuild_tensor_v2")]
)
def test_build_cannot_alter_the_allow_list(tmp_path, fmt, module, name):
    hostile = w.write_build_on_global(tmp_path / "h.pth", module, name, fmt)
    refused(hostile, r"corrupt PyTorch checkpoint \('_(StorageType|Callable)' object has no")
    legit = torch_file.load(w.write_pth(tmp_path / "ok.pth", {"w": np.float32([1.5, -2])}, fmt))
    assert legit["w"].dtype == np.float32 and legit["w"].tolist() == [1.5, -2.0]


# ----------------------------------------------------------------------------------------------
# Full-size cases: peak RSS of a process that reads each one


CHILD = """
import json, resource, sys, time
from jaxtag import torch_file
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    torch_file.load(sys.argv[1])
    message = None
except torch_file.TorchFileError as err:
    message = str(err)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps([message, time.perf_counter() - start, grown * 1024]))
"""

FULL_SIZE = {  # name -> writer (on current main, before the limits: what the issue measured)
    "zip-bomb": lambda p: w.write_zip_bomb(p, 1 << 30, 1),  # 4.1 GB after 30 s (3.2 GB one)
    "declared-bomb": lambda p: w.write_zip_bomb(p, 1 << 30, 1 << 28),  # 6.2 GB after 30 s
    "stride-0-3GB": lambda p: w.write_strided(p, (28500, 28500), (0, 0), fmt="legacy"),  # 3.1 GB
    "stride-0-4TiB": lambda p: w.write_strided(p, (1 << 20, 1 << 20), (0, 0)),  # MemoryError
    "billion-laughs": lambda p: w.write_billion_laughs(p, 9, 10),  # grows without bound
    "deep": lambda p: w.write_deep(p, 200_000),  # RecursionError traceback
    "deep-tuple-key": lambda p: w.write_deep_tuple_key(p, 200_000),  # segmentation fault
    "memo-index": lambda p: w.write_memo_index(p, (1 << 31) - 1),  # MemoryError (16 GiB)
    "od-copies": lambda p: w.write_ordered_dict_copies(p, 1000, 20_000),  # 2.4 GB, 22 s
}


def _limit_memory() -> None:  # a reader without limits stops at 3 GiB of address space here
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.slow
def test_full_size_hostile_files_in_a_process(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name, write in FULL_SIZE.items():
        path = write(tmp_path / f"{name}.pth")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            preexec_fn=_limit_memory,
        )
        assert proc.returncode == 0, (name, proc.returncode, proc.stderr[-300:])
        message, seconds, grown = json.loads(proc.stdout)
        assert message and message.startswith(f"{path}: ") and "\n" not in message, name
        assert seconds < 2.0, (name, seconds)
        assert grown < 64 << 20, (name, f"{grown / 2**20:.0f} MiB")
