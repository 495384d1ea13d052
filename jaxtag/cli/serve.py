"""Serve a model over HTTP, with a page to try it: `jaxtag serve --checkpoint SRC`.

The page (GET /) plays an audio file, shows its top tags and its taggram, and the attention
and tag-wise maps of the chunk you click; the JSON API (POST /api/tag, /api/taggram,
/api/embed, /api/explain; GET /api/health; the schema at /openapi.json) gives the numbers of
the Python API. Requests arriving together share model calls. Binds to 127.0.0.1 (this machine
only) unless --host says otherwise. Needs pip install 'jaxtag[serve]'.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxtag.cli import common
from jaxtag.serving import DEFAULT_MAX_SECONDS, DEFAULT_MAX_UPLOAD_MB

SERVE_EXTRA = ("fastapi", "uvicorn", "multipart")

# One command line each, shown by `jaxtag serve --help` (jaxtag/cli/__init__.py).
EXAMPLES = ("jaxtag serve --checkpoint ponswon --port 8000",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
        "network this machine is on)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="the port (default 8000; 0: any free one)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"longest audio accepted, in seconds (default {DEFAULT_MAX_SECONDS:g})",
    )


def missing_extra() -> str | None:
    import importlib.util

    missing = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed; serving needs: pip install 'jaxtag[serve]'"
    return None


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        problem = missing_extra()
        if problem:
            raise common.JaxtagError(problem)
        for flag, value in (
            ("--max-upload-mb", args.max_upload_mb),
            ("--max-seconds", args.max_seconds),
        ):
            if not (math.isfinite(value) and value > 0):
                raise common.JaxtagError(f"{flag} must be a number > 0, got {value:g}")
        import uvicorn

        import jaxtag
        from jaxtag.server.app import create_app, listen
        from jaxtag.serving import Limits, Service

        sock = listen(args.host, args.port)  # before the model loads: a port in use says so now
        tagger = jaxtag.load(
            args.checkpoint, args.engine, args.batch_size, precision=args.precision
        )
        limits = Limits(int(args.max_upload_mb * 2**20), args.max_seconds)
        name = os.path.basename(os.path.normpath(args.checkpoint))  # "run", not its step "500"
        service = Service(tagger, limits, name)
        config = uvicorn.Config(create_app(service), log_level="warning")
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        reach = "this machine only" if host in ("127.0.0.1", "::1") else "the network"
        print(
            f"jaxtag serve: {name} ({len(tagger.tags)} tags, {tagger.engine} engine, "
            f"{tagger.precision}) "
            f"on http://{host}:{port} ({reach}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        try:
            server.run(sockets=[sock])
        finally:
            service.close()
        return 0

    return common.guarded("jaxtag serve", body, "stopped", decodes=True)
