"""Serving logic between the routers (HTTP only) and the engine: build prompts, submit jobs, relay events
as SSE or JSON in the native (/chat) and OpenAI formats, cancel on client disconnect.

Rules: everything that can fail before generation (loading, validation, limits, prompt too long, queue full)
raises before the response starts, so it gets its own status code; the cheap checks (limits, the model name,
room in the queue) come before the tokenizer runs. After a stream started, a failure is one error event and
then the end of the stream (OpenAI: the error data, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from inf_llm import sampling
from inf_llm.engine.contexts import ContextInfo
from inf_llm.engine.events import Done, Error, PreparedPrompt, Progress, TextDelta
from inf_llm.engine.templates import Message, build_messages
from inf_llm.engine.worker import Engine, Job
from inf_llm.errors import ContextNotFoundError, QueueFullError
from inf_llm.sampling import Surface
from inf_llm.server import errors as http_errors
from inf_llm.server.errors import ModelNameError, RequestFieldError, error_payload
from inf_llm.server.protocol import (
    ChatCompletionRequest,
    ChatRequest,
    CompletionRequest,
    ContextRequest,
)
from inf_llm.server.state import ServerState

log = logging.getLogger(__name__)

# Seconds an SSE generator gets to send its farewell error event once shutdown is detected.
SHUTDOWN_GRACE_SECONDS = 3.0
SSE_SEPARATOR = "\n"


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex[:16]


class Serving:
    def __init__(self, state: ServerState):
        self.state = state
        self.preparing = 0  # requests admitted and being tokenized: they count against server.max_queue

    # --- common -----------------------------------------------------------------------------------
    @asynccontextmanager
    async def _admitted(self, engine: Engine):
        """A place among the server.max_queue waiting requests, held while the request is tokenized (before the
        tokenizer runs: a flood is refused, not tokenized and then refused)."""
        max_queue = self.state.cfg.server.max_queue
        if engine.queued + self.preparing >= max_queue:
            if self.state.metrics is not None:
                self.state.metrics.refused.labels(reason="queue_full").inc()
            raise QueueFullError(f"the server is busy: {max_queue} requests are already waiting; retry in a few "
                                 f"seconds")
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    def _check_max_new_tokens(self, value: int | None, param: str) -> None:
        limit = self.state.cfg.server.max_new_tokens_limit
        if value is not None and value > limit:
            raise RequestFieldError(f"{param}={value} is more than this server allows: at most {limit} new tokens "
                                    f"(server.max_new_tokens_limit)", param, "limit_exceeded")

    def _check_prompt(self, prompt: PreparedPrompt, param: str) -> None:
        limit = self.state.cfg.server.max_prompt_tokens
        tokens = prompt.truncated.original_tokens if prompt.truncated else prompt.tokens
        if tokens > limit:
            raise RequestFieldError(f"the prompt has {tokens} tokens, more than this server accepts: at most {limit} "
                                    f"(server.max_prompt_tokens); shorten it", param, "prompt_too_long")

    def _check_model(self, name: str | None) -> None:
        """vLLM's rule: no model, or the served one (as GET /v1/models lists it); another name is a 404."""
        if name is not None and name != self.state.model_name:
            raise ModelNameError(name)

    async def _submit(self, request: Request, prepare: Callable[[Engine], PreparedPrompt], prompt_param: str,
                      max_new_tokens: int | None, max_param: str, **sampling) -> Job:
        engine = self.state.engine_or_raise()
        self._check_max_new_tokens(max_new_tokens, max_param)
        params = engine.sampling(max_new_tokens=max_new_tokens, **sampling)
        async with self._admitted(engine):
            prompt = await run_in_threadpool(prepare, engine)  # tokenizing a long document takes a while
        self._check_prompt(prompt, prompt_param)
        try:
            job = engine.submit(prompt, params, loop=asyncio.get_running_loop(), request_id=request_id(request))
        except QueueFullError:
            if self.state.metrics is not None:
                self.state.metrics.refused.labels(reason="queue_full").inc()
            raise
        log.info("request %s: queued, prompt %d tokens%s", job.id, prompt.tokens,
                 f" (truncated from {prompt.truncated.original_tokens})" if prompt.truncated else "")
        return job

    def _sse(self, events: AsyncIterator, job: Job) -> EventSourceResponse:
        async def on_close(message) -> None:
            job.cancel()

        return EventSourceResponse(
            events,
            ping=self.state.cfg.server.keepalive_seconds,
            ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SSE_SEPARATOR),
            sep=SSE_SEPARATOR,
            headers={"Cache-Control": "no-cache"},
            client_close_handler_callable=on_close,
            shutdown_event=anyio.Event(),
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )

    @staticmethod
    async def _collect(request: Request, job: Job) -> tuple[str, Done | Error]:
        """Wait for a job's end (non-streaming), cancelling it if the client goes away meanwhile."""

        async def watch_disconnect() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancel()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        pieces: list[str] = []
        try:
            async for event in job:
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                elif isinstance(event, (Done, Error)):
                    return "".join(pieces), event
        finally:
            watcher.cancel()
            job.cancel()  # no-op after the end; stops the worker if this request is being torn down
        raise AssertionError("unreachable: a job always ends with Done or Error")

    @staticmethod
    def _sampling(body) -> dict:
        """/chat: the request's sampling fields (None: the config's generation default), max_new_tokens aside
        (`_submit` checks it against the server's limit)."""
        return {f.name: getattr(body, f.name) for f in sampling.on(Surface.CHAT) if f.name != "max_new_tokens"}

    @staticmethod
    def _openai_sampling(body) -> dict:
        """OpenAI routes follow OpenAI's semantics: a field the request leaves out gets its `openai_default`
        where it has one (no penalty the request did not ask for: an evaluation harness must get the model's
        answers, not the served chat's defaults), else the config's; the length aside, as for /chat."""
        fields = (f for f in sampling.on(Surface.OPENAI) if f.name != "max_new_tokens")
        return {f.name: (value if (value := getattr(body, f.wire_name(Surface.OPENAI))) is not None
                         else f.openai_default) for f in fields}

    # --- POST /chat -------------------------------------------------------------------------------
    async def chat(self, request: Request, body: ChatRequest, stream: bool) -> Response:
        system = body.system if body.system is not None else self.state.cfg.generation.system_prompt
        history = [Message(t.role, t.content) for t in body.history]
        messages = build_messages(body.prompt, history, system if body.context_id is None else body.system)
        job = await self._submit(request, self._chat_prompt(messages, body.context_id), "prompt",
                                 body.max_new_tokens, "max_new_tokens", **self._sampling(body))
        if body.session_id:
            log.info("request %s: session %s", job.id, body.session_id)
        if not stream:
            text, final = await self._collect(request, job)
            if isinstance(final, Error):
                return http_errors.from_event(final)
            return JSONResponse({"response": text, **final.payload()})
        return self._sse(self._chat_events(job), job)

    @staticmethod
    async def _chat_events(job: Job) -> AsyncIterator[ServerSentEvent]:
        try:
            async for event in job:
                if isinstance(event, TextDelta):
                    yield ServerSentEvent(event="token", data=_json({"text": event.text}))
                elif isinstance(event, Progress):
                    yield ServerSentEvent(event="progress", data=_json(asdict(event)))
                elif isinstance(event, Done):
                    yield ServerSentEvent(event="done", data=_json(event.payload()))
                elif isinstance(event, Error):
                    yield ServerSentEvent(event="error", data=_json(error_payload(event.message, event.type,
                                                                                  event.status, event.param)))
        finally:
            job.cancel()  # the client went away (or the stream ended): stop the worker

    @staticmethod
    def _chat_prompt(messages: list[Message], context_id: str | None) -> Callable[[Engine], PreparedPrompt]:
        """The prompt builder for `_submit`: on a document memory when `context_id` names one."""
        if context_id is None:
            return lambda engine: engine.prepare_chat(messages)
        return lambda engine: engine.library.prepare_chat(context_id, messages)

    # --- /v1/contexts -----------------------------------------------------------------------------
    async def create_context(self, request: Request, body: ContextRequest, stream: bool) -> Response:
        """Read a document into a kept memory. Everything that can fail before reading (limits, the queue)
        is a status code; while it is read, SSE `progress` events, then `context` (or one `error`)."""
        engine = self.state.engine_or_raise()
        async with self._admitted(engine):
            doc = await run_in_threadpool(engine.library.prepare, body.name, body.text, body.system)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event) -> None:
            if isinstance(event, Progress):
                loop.call_soon_threadsafe(progress.put_nowait, event)

        future = asyncio.wrap_future(engine.read_document(doc, emit, cancel))
        log.info("request %s: reading document %r, %d tokens", request_id(request), body.name, len(doc.ids))
        if not stream:
            try:
                info = await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.set()
                raise
            return JSONResponse(context_body(info), status_code=201)

        async def events() -> AsyncIterator[ServerSentEvent]:
            try:
                while not future.done():
                    waiter = asyncio.ensure_future(progress.get())
                    await asyncio.wait({waiter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if waiter.done():
                        yield ServerSentEvent(event="progress", data=_json(asdict(waiter.result())))
                    else:
                        waiter.cancel()
                if future.exception() is not None:
                    exc = future.exception()
                    status, kind = getattr(exc, "http_status", 500), getattr(exc, "error_type", "internal_error")
                    yield ServerSentEvent(event="error", data=_json(error_payload(str(exc), kind, status, None)))
                else:
                    yield ServerSentEvent(event="context", data=_json(context_body(future.result())))
            finally:
                if not future.done():  # the client went away: stop reading
                    cancel.set()

        return EventSourceResponse(events(), ping=self.state.cfg.server.keepalive_seconds, sep=SSE_SEPARATOR,
                                   ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SSE_SEPARATOR),
                                   headers={"Cache-Control": "no-cache"}, status_code=201)

    def list_contexts(self) -> dict:
        engine = self.state.engine_or_raise()
        return {"object": "list", "data": [context_body(info) for info in engine.library.list()]}

    def get_context(self, context_id: str) -> dict:
        return context_body(self.state.engine_or_raise().library.info(context_id))

    def get_context_text(self, context_id: str) -> dict:
        doc = self.state.engine_or_raise().library.document(context_id)
        return {"id": context_id, "object": "context.text", "name": doc.name, "text": doc.text}

    def delete_context(self, context_id: str) -> dict:
        if not self.state.engine_or_raise().library.delete(context_id):
            raise ContextNotFoundError(f"no document memory with id {context_id!r}")
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    # --- POST /tokenize ---------------------------------------------------------------------------
    async def tokenize(self, text: str) -> dict:
        """Counted as a waiting request while it runs (the tokenizer's thread pool is not free either)."""
        engine = self.state.engine_or_raise()
        async with self._admitted(engine):
            return {"tokens": await run_in_threadpool(engine.count_tokens, text)}

    # --- OpenAI -----------------------------------------------------------------------------------
    def _openai_messages(self, body: ChatCompletionRequest, on_document: bool = False) -> list[Message]:
        """The request's messages; the config's system prompt unless they bring one (on a document: the
        document's own system prompt, which the library adds)."""
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        default = self.state.cfg.generation.system_prompt
        if default and not on_document and not any(m.role == "system" for m in messages):
            messages.insert(0, Message("system", default))
        return messages

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        messages = self._openai_messages(body, on_document=body.context_id is not None)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        job = await self._submit(request, self._chat_prompt(messages, body.context_id), "messages",
                                 body.max_completion_tokens or body.max_tokens, max_param,
                                 **self._openai_sampling(body))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.state.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._openai_events(job, meta, "chat.completion.chunk", include_usage), job)
        text, final = await self._collect(request, job)
        if isinstance(final, Error):
            return http_errors.from_event(final)
        return JSONResponse({
            **meta, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": _openai_finish(final)}],
            "usage": _openai_usage(final), "timings": asdict(final.timings),
        })

    async def completions(self, request: Request, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        prompt_text, context_id = body.text(), body.context_id
        prepare = ((lambda engine: engine.prepare_text(prompt_text)) if context_id is None
                   else (lambda engine: engine.library.prepare_text(context_id, prompt_text)))
        job = await self._submit(request, prepare, "prompt",
                                 body.max_tokens, "max_tokens", **self._openai_sampling(body))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.state.model_name}
        prefix = prompt_text if body.echo else ""
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._openai_events(job, meta, "text_completion", include_usage, prefix), job)
        text, final = await self._collect(request, job)
        if isinstance(final, Error):
            return http_errors.from_event(final)
        return JSONResponse({
            **meta, "object": "text_completion", "system_fingerprint": None,
            "choices": [{"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": _openai_finish(final)}],
            "usage": _openai_usage(final), "timings": asdict(final.timings),
        })

    @staticmethod
    async def _openai_events(job: Job, meta: dict, kind: str, include_usage: bool,
                             prefix: str = "") -> AsyncIterator[ServerSentEvent]:
        chat = kind == "chat.completion.chunk"

        def chunk(content: str | None, finish: str | None = None, role: bool = False) -> ServerSentEvent:
            if chat:
                delta = {"role": "assistant", "content": content or ""} if role else (
                    {} if content is None else {"content": content})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            body = {**meta, "object": kind, "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return ServerSentEvent(data=_json(body))

        try:
            if chat:
                yield chunk("", role=True)
            elif prefix:
                yield chunk(prefix)
            async for event in job:
                if isinstance(event, TextDelta):
                    yield chunk(event.text)
                elif isinstance(event, Progress):
                    yield ServerSentEvent(comment=f"prefill {event.processed}/{event.total}")
                elif isinstance(event, Done):
                    yield chunk(None, _openai_finish(event))
                    if include_usage:
                        usage = {**meta, "object": kind, "system_fingerprint": None, "choices": [],
                                 "usage": _openai_usage(event), "timings": asdict(event.timings)}
                        yield ServerSentEvent(data=_json(usage))
                    yield ServerSentEvent(data="[DONE]")
                elif isinstance(event, Error):
                    yield ServerSentEvent(data=_json(error_payload(event.message, event.type, event.status,
                                                                   event.param)))
                    yield ServerSentEvent(data="[DONE]")
        finally:
            job.cancel()


def context_body(info: ContextInfo) -> dict:
    return {"id": info.id, "object": "context", "name": info.name, "tokens": info.tokens, "bytes": info.ram_bytes,
            "disk_bytes": info.disk_bytes, "where": info.where, "created": info.created, "system": info.system,
            "disk_error": info.disk_error}


def _openai_finish(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _openai_usage(done: Done) -> dict:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}
