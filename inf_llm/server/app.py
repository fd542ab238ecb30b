"""The app factory: `create_app(cfg)` -> a FastAPI app serving the InfLLM-patched model.

Lifespan: starts loading in a background thread (the port answers at once: 503 until ready), watches for
the ASGI server's shutdown signal (SIGTERM/SIGINT) to end in-flight streams with an error event, and
stops the worker on exit. Middleware, outermost first: request id + access log, CORS, API key, requests in
flight per client, body size, internal errors.
No module-level state: everything lives on `app.state.inf_llm` (a ServerState).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import AppStatus
from starlette.middleware.cors import CORSMiddleware

from inf_llm.config import InfLLMConfig
from inf_llm.server.errors import install_handlers
from inf_llm.server.middleware import ApiKey, BodyLimit, ClientLimit, InternalErrors, RequestContext
from inf_llm.server.routes import build_routes
from inf_llm.server.state import EngineFactory, ServerState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Paths that never need the API key: readiness (/status says more with the key) and the page (it asks for it).
OPEN_PATHS = frozenset({"/", "/status", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# The API docs: open only without an API key or with server.public_docs.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Routes that take the worker's or the tokenizer's time: counted by ClientLimit.
LIMITED_PATHS = frozenset({"/chat", "/tokenize", "/v1/chat/completions", "/v1/completions"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
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
    srv = cfg.server
    app.add_middleware(InternalErrors)
    app.add_middleware(BodyLimit, max_bytes=srv.max_body_bytes)
    app.add_middleware(ClientLimit, limit=srv.max_client_requests, paths=LIMITED_PATHS,
                       on_refused=state.metrics.refused.labels(reason="client_limit").inc if state.metrics else None)
    if srv.api_key:
        docs_open = srv.public_docs

        def is_open(path: str) -> bool:
            return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (docs_open and path in DOCS_PATHS)

        app.add_middleware(ApiKey, key=srv.api_key, is_open=is_open)
    elif srv.host not in LOOPBACK_HOSTS:
        log.warning("serving on %s without server.api_key: anyone who reaches the port can use the model "
                    "(README, 'Exposing the server')", srv.host)
    if cfg.server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContext)
    return app


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
