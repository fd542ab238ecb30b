"""Routers: HTTP only (paths, parameters, response declarations); the work is in serving.py."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from inf_llm.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatRequest,
    ChatResponse,
    Completion,
    CompletionRequest,
    ContextBody,
    ContextDeleted,
    ContextList,
    ContextRequest,
    ContextText,
    ErrorBody,
    ModelList,
    PublicStatus,
    StatusResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from inf_llm.server.serving import Serving
from inf_llm.server.state import ServerState

_ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "prompt too long (server.max_prompt_tokens, or max_len with truncation: error), a limit exceeded "
             "(server.max_new_tokens_limit), an unsupported field, text that is not valid Unicode, an empty body, "
             "or a conversation the chat template rejects (`param` names the field)",
        401: "API key missing or wrong",
        404: "an OpenAI request names a model this server does not serve",
        413: "request body larger than server.max_body_bytes",
        415: "the body is not sent as application/json",
        422: "validation error (the field is named in `param`)",
        429: "the queue is full, or this client has server.max_client_requests requests in flight (see Retry-After)",
        503: "the model is loading, failed to load, or the server is shutting down",
    }.items()
}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}

_PLACEHOLDER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>inf_llm</title></head>
<body><h1>inf_llm server</h1><p>The web page is not installed (inf_llm/static/index.html is missing).
The API is available: <a href="status">/status</a>, <a href="docs">/docs</a>.</p></body></html>"""


def build_routes(app: FastAPI, state: ServerState, static_dir: Path) -> None:
    serving = Serving(state)
    router = APIRouter()

    @router.get("/status", response_model=StatusResponse | PublicStatus, tags=["status"],
                responses={503: {"model": StatusResponse | PublicStatus,
                                 "description": "not ready (loading or failed)"}})
    async def status(request: Request) -> JSONResponse:
        """Readiness (200 when ready, 503 otherwise) and the served configuration. Never needs an API key, but
        on a server with one only `ready`, `state`, `progress` and `auth_required` come without it."""
        body = state.status(full=request.scope.get("state", {}).get("authorized", True))
        return JSONResponse(body, status_code=200 if body["ready"] else 503,
                            headers={"Cache-Control": "no-store"})

    @router.post("/chat", tags=["chat"], response_model=ChatResponse,
                 responses={**_ERRORS, 200: {"content": _SSE, "description": "SSE stream, or JSON with stream=false"}})
    async def chat(request: Request, body: ChatRequest,
                   stream: bool = Query(True, description="false: one JSON response")) -> Response:
        """Chat with the model. SSE events: `token` {text}, `progress` {processed, total}, `done`
        {finish_reason, usage, timings, truncated, retrieval}, `error` {error}."""
        return await serving.chat(request, body, stream)

    @router.post("/tokenize", tags=["chat"], response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        """Number of tokens of `text` (no special tokens): what an attachment costs in context."""
        return await serving.tokenize(body.text)

    @router.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletion,
                 responses={**_ERRORS, 200: {"content": _SSE, "description": "JSON, or SSE with stream=true"}})
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await serving.chat_completions(request, body)

    @router.post("/v1/completions", tags=["openai"], response_model=Completion,
                 responses={**_ERRORS, 200: {"content": _SSE, "description": "JSON, or SSE with stream=true"}})
    async def completions(request: Request, body: CompletionRequest) -> Response:
        """Raw prompt, no chat template (what evaluation harnesses use)."""
        return await serving.completions(request, body)

    @router.post("/v1/contexts", tags=["contexts"], response_model=ContextBody, status_code=201,
                 responses={**_ERRORS, 201: {"content": _SSE, "description": "JSON, or SSE with stream=true"}})
    async def create_context(request: Request, body: ContextRequest,
                             stream: bool = Query(False, description="true: SSE progress while it is read")
                             ) -> Response:
        """Read a document once and keep its memory (RAM and disk): chats that name its id (`context_id`)
        continue from it. SSE events: `progress` {processed, total}, then `context` (the info) or `error`."""
        return await serving.create_context(request, body, stream)

    @router.get("/v1/contexts", tags=["contexts"], response_model=ContextList, responses={401: _ERRORS[401]})
    async def list_contexts() -> dict:
        """The document memories: in RAM, on disk (saved by this or an earlier run of the server), or both."""
        return serving.list_contexts()

    @router.get("/v1/contexts/{context_id}", tags=["contexts"], response_model=ContextBody, responses=_ERRORS)
    async def get_context(context_id: str) -> dict:
        return serving.get_context(context_id)

    @router.get("/v1/contexts/{context_id}/text", tags=["contexts"], response_model=ContextText, responses=_ERRORS)
    async def get_context_text(context_id: str) -> dict:
        """The document's text, as it was read (what the model reads of it)."""
        return serving.get_context_text(context_id)

    @router.delete("/v1/contexts/{context_id}", tags=["contexts"], response_model=ContextDeleted, responses=_ERRORS)
    async def delete_context(context_id: str) -> dict:
        """Forget a document memory, in RAM and on disk."""
        return serving.delete_context(context_id)

    @router.get("/v1/models", tags=["openai"], response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> dict:
        created = int(state.started_at)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": created,
                                            "owned_by": "inf_llm"}]}

    if state.metrics is not None:
        metrics = state.metrics

        @router.get("/metrics", tags=["status"], response_class=Response,
                    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type=metrics.content_type)

    index = static_dir / "index.html"

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        if index.is_file():
            return FileResponse(index, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(_PLACEHOLDER_PAGE)

    app.include_router(router)
