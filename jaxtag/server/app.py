"""The HTTP face of `jaxtag.serving.Service`: a FastAPI app with the page and the JSON API.

    GET  /                 the page (jaxtag/server/static/: no CDN, nothing from the internet)
    GET  /api/health       the model, its tags, the engine and precision, the limits
    POST /api/tag          multipart field `audio`; ?top_k=5
    POST /api/taggram      the same, plus the taggram of adjacent windows
    POST /api/embed        ?layer=pooled
    POST /api/explain      ?start=S&tags=a,b&format=json|png
    GET  /openapi.json     the schema of all of the above

Errors are JSON `{"error": "one line"}` with a 4xx status: 400 a malformed request, 413 an
upload or a duration over the limits, 422 audio that cannot be used or a parameter the model
cannot answer (an unknown tag or layer, a start past the end). Uploads are written to a private
temporary folder, read there and removed; no request names a server-side path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxtag.errors import JaxtagError
from jaxtag.serving import Service, ServiceError, upload_name, upload_suffix

STATIC = Path(__file__).parent / "static"
AUDIO = File(..., description="the audio file (wav, flac, ogg, mp3, ...)")


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, from its
    Content-Length before anything is read, or as soon as a streamed body passes the limit."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"the upload is larger than this server takes ({self.max_bytes / 2**20:g} MB)"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"").decode()
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"error": self.message()}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI passes an HTTPException through body parsing
                raise HTTPException(413, self.message())
            return message

        return await self.app(scope, counted, send)


def create_app(service: Service) -> Any:
    """The ASGI app (FastAPI) serving `service`; run it with uvicorn (`jaxtag serve`) or any
    ASGI server."""
    app = FastAPI(
        title="jaxtag",
        summary="Music tags, taggrams, embeddings and attention maps of uploaded audio",
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN
        redoc_url=None,
    )

    @app.exception_handler(ServiceError)
    async def refused(request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
            for e in err.errors()
        )
        return JSONResponse({"error": problems}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    async def answer(upload: UploadFile, method: Callable, *args: Any) -> Any:
        """`method(path, name, *args)` on the upload saved to a private temporary file."""
        name = upload_name(upload.filename)
        folder = tempfile.mkdtemp(prefix="jaxtag-upload-")
        try:
            path = os.path.join(folder, "upload" + upload_suffix(name))

            def run() -> Any:
                with open(path, "wb") as f:
                    shutil.copyfileobj(upload.file, f, 1 << 20)
                return method(path, name, *args)

            return await run_in_threadpool(run)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    async def health() -> dict:
        """The model (its tags, engine, precision, layers) and the server's limits."""
        return service.health()

    @app.post("/api/tag")
    async def tag(audio: UploadFile = AUDIO, top_k: int = Query(5, ge=1)) -> dict:
        """The track's top tags, best first, and every tag's probability."""
        return await answer(audio, service.tag, top_k)

    @app.post("/api/taggram")
    async def taggram(audio: UploadFile = AUDIO, top_k: int = Query(5, ge=1)) -> dict:
        """The tags (as /api/tag) and the probabilities of adjacent ~4.1 s windows."""
        return await answer(audio, service.taggram, top_k)

    @app.post("/api/embed")
    async def embed(audio: UploadFile = AUDIO, layer: str = "pooled") -> dict:
        """One vector for the track: `pooled`, `front_end` or `layer_<i>`."""
        return await answer(audio, service.embed, layer)

    @app.post("/api/explain", response_model=None)
    async def explain(
        audio: UploadFile = AUDIO,
        start: float = Query(0.0, ge=0, allow_inf_nan=False, description="seconds"),
        tags: str | None = Query(None, description="comma-separated; default the top 3"),
        format: str = Query("json", pattern="^(json|png)$"),
    ) -> Any:
        """The attention and tag-wise maps of the chunk at `start`: JSON, or the figure of
        `jaxtag explain` as a PNG."""
        chosen = [t.strip() for t in tags.split(",") if t.strip()] if tags else None
        if format == "png":
            png, chunk_start = await answer(audio, service.explain_png, start, chosen)
            # the chunk's start on the frame grid, for the page's heading
            headers = {"X-Chunk-Start": f"{chunk_start:.3f}"}
            return Response(png, media_type="image/png", headers=headers)
        return await answer(audio, service.explain, start, chosen)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(UploadLimit, max_bytes=service.limits.max_upload_bytes)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: a free one).

    Raises:
      JaxtagError: the address cannot be used (in use, not this machine's, a bad port).
    """
    if not 0 <= port <= 65535:
        raise JaxtagError(f"port must be in 0-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise JaxtagError(f"cannot listen on {host}:{port} ({why})") from err


@contextlib.contextmanager
def serving_in_background(
    service: Service, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serves `service` with uvicorn in a thread until the block ends (a notebook, a test, a
    benchmark); yields the base URL. Port 0 takes a free one."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    sock = listen(host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
