"""A local stand-in for the released weights' server: a generated `.pth` (tests/pth_writer.py,
no torch) served on 127.0.0.1 with switchable faults, and `jaxtag.released` pointed at it through
its test-only environment overrides. No test touches the internet."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jaxtag import released
from jaxtag.released import git_blob_id
from tests.pth_writer import random_state_dict, write_pth

CUT = 10_000  # bytes the server sends before it cuts a connection


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
    path: Path  # a legacy-format .pth, like the released ponswon.pth
    state: dict[str, np.ndarray]
    data: bytes
    blob_id: str


@pytest.fixture(scope="session")
def released_pth(tmp_path_factory: pytest.TempPathFactory) -> ReleasedFile:
    """A generated stand-in for ponswon.pth (small random model, legacy format), once a session."""
    state = random_state_dict()
    path = write_pth(tmp_path_factory.mktemp("released") / "ponswon.pth", state, "legacy")
    return ReleasedFile(path, state, path.read_bytes(), git_blob_id(path))


class FileServer:
    """Serves one file at `url` (Range requests answered 206) or, by `mode`, a fault:

    "ok"; an int (that HTTP status); "html" (a text/html page); "html_sniff" (an HTML body sent as
    application/octet-stream); "cut" (close after `cut_after` bytes); "no_range" (always 200);
    "wrong" (other bytes). `requests` records (Range header or None, status) of each GET.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.mode: str | int = "ok"
        self.cut_after = CUT
        self.requests: list[tuple[str | None, int]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.answer(self)

            def log_message(self, *args: object) -> None:
                pass  # keep the test output clean

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/models/ponswon.pth"
        self.running = True

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        asked = handler.headers.get("Range")
        mode, body, status = self.mode, self.body, 200
        if isinstance(mode, int):
            self.requests.append((asked, mode))
            handler.send_error(mode)
            return
        if mode in ("html", "html_sniff"):
            body = b"<!DOCTYPE html>\n<html><body>Please log in to continue</body></html>\n"
        elif mode == "wrong":
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        start = 0
        if asked and mode not in ("no_range", "html", "html_sniff"):
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.requests.append((asked, 416))
                handler.send_error(416)
                return
            status = 206
        self.requests.append((asked, status))
        handler.send_response(status)
        kind = "text/html; charset=utf-8" if mode == "html" else "application/octet-stream"
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        sent = body[start:]
        if mode == "cut":
            sent = sent[: self.cut_after]  # then the connection closes, short of Content-Length
        handler.wfile.write(sent)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def released_server(released_pth: ReleasedFile) -> Iterator[FileServer]:
    """A local HTTP server serving `released_pth` (mode "ok"); stopped after the test."""
    server = FileServer(released_pth.data)
    yield server
    server.stop()


@pytest.fixture
def released_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, released_server: FileServer,
    released_pth: ReleasedFile,
) -> Path:  # fmt: skip
    """jaxtag.released pointed at `released_server` (URL, blob id) with an empty weights dir."""
    monkeypatch.setenv(released.TEST_URL_ENV, released_server.url)
    monkeypatch.setenv(released.TEST_BLOB_ID_ENV, released_pth.blob_id)
    monkeypatch.setenv(released.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    return tmp_path / "weights"
