"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming/disconnect detection).

- RequestContext: a request id (the client's X-Request-ID or a new one) in `scope["state"]` and in the
  response headers; one INFO access-log line per request (method, path, status, duration; never bodies).
- ApiKey: 401 without the configured key, except on the open paths; marks `scope["state"]["authorized"]`.
- ClientLimit: 429 when one client address already has `server.max_client_requests` requests in flight.
- BodyLimit: 413 when Content-Length, or the bytes actually received, exceed `server.max_body_bytes`.
- InternalErrors: a bug is a 500 in the error shape, and the connection stays usable.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inf_llm.server.errors import AuthenticationError, ClientLimitError, error_payload, retry_headers

log = logging.getLogger("inf_llm.server.access")
bug_log = logging.getLogger("inf_llm.server")

# A client-supplied request id is echoed only if it looks like an id (no log injection).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s -> %s in %.0f ms", rid, scope["method"], scope["path"], status or "disconnected",
                     (time.perf_counter() - start) * 1000)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large:
                # The app turned the failed body read into its own error (FastAPI answers 400): answer 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        # connection: close: the rest of the body is not read, so the connection cannot carry another request
        await send_error(send, 413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                         f"(server.max_body_bytes)", "request_too_large", close=True)


class ApiKey:
    """Require `Authorization: Bearer <key>` or `x-api-key: <key>` on every path except those `is_open` accepts;
    `scope["state"]["authorized"]` says whether the request carried the key (/status shows more then)."""

    def __init__(self, app: ASGIApp, key: str, is_open: Callable[[str], bool]):
        self.app = app
        self.key = key.encode()
        self.is_open = is_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and given is None:
                given = value.strip()
        authorized = given is not None and secrets.compare_digest(given, self.key)
        scope.setdefault("state", {})["authorized"] = authorized
        if authorized or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        message = ("API key missing: send Authorization: Bearer <key> or x-api-key: <key>" if given is None
                   else "API key is wrong")
        await send_error(send, 401, message, AuthenticationError.error_type)


class ClientLimit:
    """At most `limit` requests in flight per client address on the POST `paths`, counted from arrival to the
    end of the response (a stream's last event): one client cannot fill the queue of the single worker. Checked
    before the body is read. The address is uvicorn's client, which honours X-Forwarded-For from the proxies
    of --forwarded-allow-ips."""

    def __init__(self, app: ASGIApp, limit: int, paths: frozenset[str],
                 on_refused: Callable[[], None] | None = None):
        self.app = app
        self.limit = limit
        self.paths = paths
        self.on_refused = on_refused
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        n = self.in_flight.get(client, 0)
        if n >= self.limit:
            if self.on_refused is not None:
                self.on_refused()
            await send_error(send, 429, f"this client already has {n} requests in flight, the server's limit per "
                             f"client (server.max_client_requests); wait for one to end", ClientLimitError.error_type,
                             headers=retry_headers(429))  # uvicorn drains the unread body: the connection stays
            return
        self.in_flight[client] = n + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.in_flight[client] - 1
            if left:
                self.in_flight[client] = left
            else:
                del self.in_flight[client]


class InternalErrors:
    """A bug in a route becomes a 500 in the error shape, and the connection stays open for the next request.
    (Starlette's ServerErrorMiddleware answers and then re-raises, and uvicorn closes a connection whose app
    raised: a keep-alive client's next request failed with "connection reset".)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # a bug anywhere below: log it once, answer if nothing was sent yet
            bug_log.exception("request %s failed", scope.get("state", {}).get("request_id", "-"))
            if not started:
                await send_error(send, 500, f"internal error ({type(exc).__name__})", "internal_error")


async def send_error(send: Send, status: int, message: str, type_: str, headers: dict[str, str] | None = None,
                     close: bool = False) -> None:
    """Answer with the one error body from middleware (below FastAPI's exception handlers)."""
    body = json.dumps(error_payload(message, type_, status)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """Raised inside receive() to unwind the app when a chunked body passes the limit."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
