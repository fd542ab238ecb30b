"""The app factory: `create_app(cfg)` -> a FastAPI app serving the InfLLM-patched model.

Lifespan: starts loading in a background thread (the port answers at once: 503 until ready), watches for
the ASGI server's shutdown signal (SIGTERM/SIGINT) to end in-flight streams with an error event, and
stops the worker on exit. Middleware, outermost first: request id + access log, CORS, API key, body size.
No module-level state: everything lives on `app.state.inf_llm` (a ServerState).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import AppStatus
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from inf_llm.config import InfLLMConfig
from inf_llm.server.errors import AuthenticationError, error_payload, install_handlers, retry_headers
from inf_llm.server.middleware import BodyLimit, RequestContext
from inf_llm.server.routes import build_routes
from inf_llm.server.state import EngineFactory, ServerState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Paths that never need the API key: readiness, the page (it asks for the key) and the API docs.
OPEN_PATHS = frozenset({"/", "/status", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# How often the lifespan checks whether the ASGI server was asked to exit.
EXIT_POLL_SECONDS = 0.2


def create_app(cfg: InfLLMConfig, engine_factory: EngineFactory | None = None,
               static_dir: Path | None = None) -> FastAPI:
    """A new app (own state, own metrics registry). `engine_factory(cfg, progress)` defaults to loading the
    configured model (inf_llm.engine.load_engine)."""
    state = ServerState(cfg, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        watcher = asyncio.create_task(_watch_exit(state))
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(state.finish_shutdown)

    app = FastAPI(
        title="inf_llm",
        summary="Long-context chat server: InfLLM training-free context memory over a transformers model",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.inf_llm = state
    install_handlers(app)
    static = static_dir or STATIC_DIR
    build_routes(app, state, static)
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")
    else:
        log.warning("no web page: %s does not exist (the API still works)", static)

    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(BodyLimit, max_bytes=cfg.server.max_body_bytes)
    if cfg.server.api_key:
        app.add_middleware(ApiKey, key=cfg.server.api_key)
    if cfg.server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContext)
    return app


class ApiKey:
    """Require `Authorization: Bearer <key>` or `x-api-key: <key>` on every path except OPEN_PATHS."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and given is None:
                given = value.strip()
        if given is not None and secrets.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        message = ("API key missing: send Authorization: Bearer <key> or x-api-key: <key>" if given is None
                   else "API key is wrong")
        body = json.dumps(error_payload(message, AuthenticationError.error_type, 401)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (retry_headers(401) or {}).items()]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _watch_exit(state: ServerState) -> None:
    """End in-flight requests as soon as the ASGI server is asked to exit (uvicorn waits for open streams
    before running the lifespan shutdown, so this cannot wait for it)."""
    while True:
        if AppStatus.should_exit or _uvicorn_should_exit():
            state.begin_shutdown()
            return
        await asyncio.sleep(EXIT_POLL_SECONDS)


def _uvicorn_should_exit() -> bool:
    """uvicorn installs its Server.handle_exit as the SIGTERM/SIGINT handler: read its flag."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        server = getattr(signal.getsignal(sig), "__self__", None)
        if server is not None and getattr(server, "should_exit", False):
            return True
    return False
