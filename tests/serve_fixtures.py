"""`jaxtag serve`'s app on a real uvicorn server in a thread, on a free port of 127.0.0.1 (for
the HTTP tests' concurrent clients and the browser test)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from jaxtag.server.app import create_app
from jaxtag.serving import Service


@contextlib.contextmanager
def running_server(service: Service) -> Iterator[str]:
    """Serves `service` until the block ends; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
