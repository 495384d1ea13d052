"""`jaxtag.released`: download, verify, resume, convert and cache, against a local HTTP server.

No test touches the internet: `released_server` serves a generated `.pth` (`released_pth`, written
by tests/pth_writer.py without torch) on 127.0.0.1 and can be switched into fault modes; the
`released_cache` fixture points the module at it through the test-only environment overrides.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxtag import released
from jaxtag.errors import JaxtagError
from jaxtag.released import DownloadError, fetch, git_blob_id
from jaxtag.tags import MTAT_TOP50
from jaxtag.torch_file import load_state_dict
from tests.pth_writer import write_pth
from tests.released_fixtures import CUT, FileServer, ReleasedFile

REPO = Path(__file__).resolve().parents[1]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message and message == message.strip(), message
    return message


def refused_url() -> str:
    """A URL on a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/ponswon.pth"


# ----------------------------------------------------------------------------------------------
# The .pth writer and the blob id


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_pth_writer_reads_back_exactly(tmp_path: Path, released_pth: ReleasedFile, fmt: str):
    state = {**released_pth.state, "scalar": np.array(2.5, np.float64), "ids": np.arange(3)}
    path = write_pth(tmp_path / f"{fmt}.pth", state, fmt)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_pth_writer_loads_in_torch(tmp_path: Path, released_pth: ReleasedFile, fmt: str):
    torch = importlib.import_module("torch")  # not a module-level import: see conftest
    path = write_pth(tmp_path / f"{fmt}.pth", released_pth.state, fmt)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(released_pth.state)
    for key, value in released_pth.state.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_git_blob_id_matches_git(tmp_path: Path, released_pth: ReleasedFile):
    big = tmp_path / "big.bin"  # several 1 MiB blocks and a partial one
    big.write_bytes(np.random.default_rng(0).bytes(2 * (1 << 20) + 12345))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (released_pth.path, big, empty):
        git = subprocess.check_output(["git", "hash-object", str(path)], cwd=tmp_path, text=True)
        assert git_blob_id(path) == git.strip(), path
    assert git_blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


# ----------------------------------------------------------------------------------------------
# Registry and paths


def test_registry_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    entry = released.RELEASED["ponswon"]
    assert entry.url.endswith("/minzwon/self-attention-music-tagging/raw/master/models/ponswon.pth")
    assert entry.blob_id == "d5925c99ada6c4f5500a2546c8b62bec20f87d79"
    assert (entry.filename, entry.num_heads, tuple(entry.tags)) == ("ponswon.pth", 8, MTAT_TOP50)
    assert released.is_released_name("ponswon") and not released.is_released_name("ponswon.pth")
    with pytest.raises(JaxtagError, match="known: ponswon"):
        released.released("nope")
    monkeypatch.setenv(released.TEST_URL_ENV, "http://127.0.0.1:1/x.pth")
    monkeypatch.setenv(released.TEST_BLOB_ID_ENV, "0" * 40)
    assert released.released("ponswon").url == "http://127.0.0.1:1/x.pth"  # read at call time
    assert released.released("ponswon").blob_id == "0" * 40
    monkeypatch.delenv(released.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert released.weights_dir() == tmp_path / "xdg" / "jaxtag" / "weights"
    monkeypatch.setenv(released.WEIGHTS_DIR_ENV, str(tmp_path / "mine"))
    assert released.weights_dir() == tmp_path / "mine"


def test_import_does_not_load_jax():
    code = "import sys, jaxtag.released; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------------------------
# Downloads


def test_first_call_converts_and_caches(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile
):
    import jax

    from jaxtag import convert
    from jaxtag.checkpoint import load_model

    path = released.converted_checkpoint(progress=False)
    assert path == released_cache / "ponswon"
    pth = released_cache / "ponswon.pth"
    assert pth.read_bytes() == released_pth.data and git_blob_id(pth) == released_pth.blob_id
    assert not (released_cache / "ponswon.pth.part").exists()
    assert released_server.requests == [(None, 200)]
    model = load_model(path)
    assert model.tags == list(MTAT_TOP50)
    assert (model.config.width, model.config.num_layers, model.config.num_heads) == (32, 1, 8)
    assert model.meta["source_sha256"] == hashlib.sha256(released_pth.data).hexdigest()
    leaves = jax.tree_util.tree_flatten_with_path(model.variables)[0]
    for keys, value in leaves:
        names = tuple(k.key for k in keys)[1:]
        expected = convert.to_flax(names, released_pth.state["module." + convert.torch_key(names)])
        np.testing.assert_array_equal(value, expected, err_msg=str(names))
    counters = [k for k in released_pth.state if k.endswith("num_batches_tracked")]
    assert len(leaves) == len(released_pth.state) - len(counters)
    released_server.stop()  # from here on, any network use fails
    assert released.converted_checkpoint(progress=False) == path
    assert fetch(progress=False) == pth


def test_a_conversion_of_an_older_format_is_made_again_offline(
    released_cache: Path, released_server: FileServer
):
    from jaxtag import checkpoint
    from tests.test_checkpoint_integrity import edit_meta

    path = released.converted_checkpoint(progress=False)
    released_server.stop()

    def as_previous_format(meta: dict) -> None:  # what `jaxtag convert` wrote before format 2
        del meta[checkpoint.FORMAT_KEY], meta[checkpoint.DIGESTS]["meta"]

    edit_meta(path, as_previous_format)
    assert checkpoint.FORMAT_KEY not in checkpoint.read_meta(path)
    assert released.converted_checkpoint(progress=False) == path  # from the cached .pth
    assert checkpoint.read_meta(path)[checkpoint.FORMAT_KEY] == checkpoint.FORMAT
    assert checkpoint.load_model(path).tags == list(MTAT_TOP50)


def test_resume_after_cut(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile
):
    released_server.mode = "cut"
    with pytest.raises(DownloadError) as err:
        fetch(progress=False)
    message = one_line(err)
    assert "run again to resume" in message and f"{CUT} of {len(released_pth.data)}" in message
    part = released_cache / "ponswon.pth.part"
    assert part.read_bytes() == released_pth.data[:CUT]
    assert not (released_cache / "ponswon.pth").exists()
    released_server.mode = "ok"
    assert fetch(progress=True) == released_cache / "ponswon.pth"  # a bar from CUT, on stderr
    assert released_server.requests == [(None, 200), (f"bytes={CUT}-", 206)]
    assert (released_cache / "ponswon.pth").read_bytes() == released_pth.data
    assert not part.exists()


def test_server_ignoring_range_restarts(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile
):
    released_server.mode = "cut"
    with pytest.raises(DownloadError, match="resume"):
        fetch(progress=False)
    released_server.mode = "no_range"
    path = fetch(progress=False)
    assert released_server.requests[-1] == (f"bytes={CUT}-", 200)  # asked, got the whole file
    assert path.read_bytes() == released_pth.data  # not the cut prefix plus the whole file


@pytest.mark.parametrize("complete", [False, True])
def test_part_beyond_the_file_416(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile, complete: bool
):
    released_cache.mkdir(parents=True)
    data = released_pth.data if complete else b"\0" * (len(released_pth.data) + 100)
    (released_cache / "ponswon.pth.part").write_bytes(data)
    path = fetch(progress=False)
    assert path.read_bytes() == released_pth.data
    asked = f"bytes={len(data)}-"
    # a complete .part (a crash before the rename) is verified and kept; garbage restarts at 0
    assert released_server.requests == [(asked, 416)] + ([] if complete else [(None, 200)])


@pytest.mark.parametrize("mode", ["html", "html_sniff"])
def test_html_page_is_refused(released_cache: Path, released_server: FileServer, mode: str):
    released_server.mode = mode
    with pytest.raises(DownloadError) as err:
        fetch(progress=False)
    message = one_line(err)
    assert "HTML page" in message and released_server.url in message and "by hand" in message
    assert not (released_cache / "ponswon.pth").exists()
    assert not (released_cache / "ponswon.pth.part").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status(released_cache: Path, released_server: FileServer, status: int):
    released_server.mode = status
    with pytest.raises(DownloadError) as err:
        fetch(progress=False)
    message = one_line(err)
    assert f"HTTP {status}" in message and released_server.url in message
    assert [p.name for p in released_cache.iterdir()] == ["ponswon.pth.lock"]  # no .part


def test_connection_refused(released_cache: Path, monkeypatch: pytest.MonkeyPatch):
    url = refused_url()
    monkeypatch.setenv(released.TEST_URL_ENV, url)
    with pytest.raises(DownloadError) as err:
        released.converted_checkpoint(progress=False)
    message = one_line(err)
    final = released_cache / "ponswon.pth"
    assert message.startswith(f"cannot reach {url} (") and "refused" in message
    assert f"download {url} by hand and put it at {final}" in message
    assert "jaxtag.load('/path/to/ponswon.pth')" in message
    assert "jaxtag convert /path/to/ponswon.pth OUT" in message
    assert not final.exists() and not (released_cache / "ponswon").exists()


def test_wrong_hash(released_cache: Path, released_server: FileServer, released_pth: ReleasedFile):
    released_server.mode = "wrong"
    wrong = released_pth.data[:-1] + bytes([released_pth.data[-1] ^ 0xFF])
    got = hashlib.sha1(b"blob %d\0" % len(wrong) + wrong).hexdigest()
    with pytest.raises(DownloadError) as err:
        fetch(progress=False)
    message = one_line(err)
    assert f"(expected {released_pth.blob_id}, got {got})" in message and "git blob id" in message
    assert not (released_cache / "ponswon.pth.part").exists()
    assert not (released_cache / "ponswon.pth").exists()


# ----------------------------------------------------------------------------------------------
# Files put there by hand, concurrent callers


def test_hand_placed_file_is_used_offline(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile
):
    released_server.stop()
    released_cache.mkdir(parents=True)
    (released_cache / "ponswon.pth").write_bytes(released_pth.data)
    assert fetch(progress=False) == released_cache / "ponswon.pth"
    assert released_server.requests == []


def test_hand_placed_wrong_file_is_refused_and_kept(
    released_cache: Path, released_server: FileServer
):
    released_cache.mkdir(parents=True)
    final = released_cache / "ponswon.pth"
    final.write_bytes(b"some other weights")
    with pytest.raises(DownloadError) as err:
        fetch(progress=False)
    message = one_line(err)
    assert f"the file at {final} is not the released ponswon weights" in message
    assert "left in place" in message and git_blob_id(final) in message
    assert final.read_bytes() == b"some other weights"
    assert released_server.requests == []


@pytest.mark.slow  # two processes
def test_two_processes_download_once(
    released_cache: Path, released_server: FileServer, released_pth: ReleasedFile
):
    released_cache.mkdir(parents=True)
    code = "from jaxtag.released import fetch; print(fetch(progress=False))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # with the fixture's overrides
    with open(released_cache / "ponswon.pth.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # both processes must wait for this one
        run, pipe = [sys.executable, "-c", code], subprocess.PIPE
        procs = [subprocess.Popen(run, env=env, stdout=pipe, stderr=pipe, text=True) for _ in "ab"]
        time.sleep(1.5)  # time to start and block on the lock
        assert released_server.requests == []
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(released_cache / "ponswon.pth")
    assert released_server.requests == [(None, 200)]
    assert (released_cache / "ponswon.pth").read_bytes() == released_pth.data
