"""The routing key of a request (which conversation it continues), and the ASGI middleware that puts it where
Ray Serve's router reads it.

Ray Serve routes a request to the replica that holds its "multiplexed model id", read by the HTTP proxy from
the `serve_multiplexed_model_id` header only (ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID); the
replicas here register the key of each conversation they serve under that id (see ray_serve.py). The key:

1. the `serve_multiplexed_model_id` header, if the client sends one (used as is);
2. the `X-Session-Id` header;
3. the body's `session_id` field (`/chat` defines it; the OpenAI routes accept it as an extra field, e.g.
   `extra_body={"session_id": ...}` in the openai client);
4. otherwise a digest of the conversation's opening (the messages up to and including the first user
   message), which every later turn of the same chat repeats, so plain `/chat` and `/v1/chat/completions`
   clients get affinity without sending anything new. Two chats that open with the same words share a key
   (and so a replica).

`SessionKeyMiddleware` runs inside Ray Serve's HTTP proxy (installed by `proxy_middlewares`, named by the
environment variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH), so this module imports only the standard
library and starlette: no torch, no ray, nothing of inf_llm.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Ray Serve's routing header (the proxy also accepts dashes for the underscores).
MULTIPLEXED_MODEL_ID_HEADER = "serve_multiplexed_model_id"
# The header the nginx set-up of docs/deployment.md already uses for affinity.
SESSION_HEADER = "x-session-id"
# What the proxy must be told to load, in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "inf_llm.deploy.affinity.proxy_middlewares"
# Routes whose JSON body carries a conversation.
KEYED_PATHS = frozenset({"/chat", "/v1/chat/completions", "/v1/completions"})
# Bodies up to this size are read for a key (= the default server.max_body_bytes); a larger one is passed on
# unread and unkeyed (the replica refuses it with 413 unless its limit was raised).
MAX_KEYED_BODY_BYTES = 32 * 1024 * 1024
# Above this size the JSON is parsed in a thread, so a long document does not stall the proxy's event loop.
PARSE_IN_THREAD_BYTES = 1024 * 1024
# A client's id is used verbatim when it is this tame (it ends up in Ray's logs and metric tags); any other
# id is hashed.
PLAIN_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# Hex digits kept of a SHA-256 digest: 128 bits, no collisions in practice.
DIGEST_CHARS = 32


def _digest(prefix: str, value: Any) -> str:
    data = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
    return f"{prefix}-{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}"


def normalize_session_id(session_id: str) -> str:
    """A client's session id as a routing key: itself if plain, else a digest of it."""
    return session_id if PLAIN_ID.fullmatch(session_id) else _digest("sid", session_id)


def conversation_opening(path: str, body: dict) -> list[list] | None:
    """The (role, content) pairs up to and including the first user message; None for a route without a
    conversation or a body that has none. `/chat`'s `bot` role is `assistant`, as the server reads it."""
    if path == "/chat":
        turns = body.get("history") or []
        messages = [{"role": "system", "content": body["system"]}] if body.get("system") is not None else []
        messages += [t for t in turns if isinstance(t, dict)]
        messages.append({"role": "user", "content": body.get("prompt")})
    elif path == "/v1/chat/completions":
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    else:
        return None
    opening = []
    for m in messages:
        role = "assistant" if m.get("role") == "bot" else m.get("role")
        opening.append([role, m.get("content")])
        if role == "user":
            return opening
    return None


def session_key(path: str, body: Any) -> str | None:
    """The routing key of a JSON request body (rules 3 and 4 of the module docstring), or None."""
    if not isinstance(body, dict):
        return None
    session_id = body.get("session_id")
    if isinstance(session_id, str) and session_id:
        return normalize_session_id(session_id)
    opening = conversation_opening(path, body)
    return _digest("conv", opening) if opening is not None else None


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.replace("-", "_")
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower().replace("-", "_") == wanted:
            return value.decode("latin-1")
    return None


class SessionKeyMiddleware:
    """Sets the `serve_multiplexed_model_id` header of a request from its session (module docstring). A body
    it reads is handed on unchanged."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _header(scope, MULTIPLEXED_MODEL_ID_HEADER):
            await self.app(scope, receive, send)
            return
        explicit = _header(scope, SESSION_HEADER)
        if explicit:
            await self.app(_with_key(scope, normalize_session_id(explicit)), receive, send)
            return
        length = _header(scope, "content-length")
        if (scope["method"] != "POST" or scope["path"] not in KEYED_PATHS
                or (length is not None and length.isdigit() and int(length) > MAX_KEYED_BODY_BYTES)):
            await self.app(scope, receive, send)
            return
        messages, body, complete = await _read_body(receive)
        key = None
        if complete:
            try:
                parsed = (await asyncio.to_thread(json.loads, body) if len(body) > PARSE_IN_THREAD_BYTES
                          else json.loads(body))
            except ValueError:  # not JSON (UnicodeDecodeError is one): the replica answers 422
                parsed = None
            key = session_key(scope["path"], parsed)
        await self.app(_with_key(scope, key) if key else scope, _replay(messages, receive), send)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes, bool]:
    """Read request messages until the body is complete, the client left, or MAX_KEYED_BODY_BYTES is passed.
    Returns the messages read (to replay), the body and whether it is complete."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, b"", False
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages), True
        if size > MAX_KEYED_BODY_BYTES:
            return messages, b"", False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _with_key(scope: Scope, key: str) -> Scope:
    headers = [*scope.get("headers", []), (MULTIPLEXED_MODEL_ID_HEADER.encode(), key.encode())]
    return {**scope, "headers": headers}


def proxy_middlewares() -> list:
    """The Ray Serve HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=PROXY_CALLBACK)."""
    from starlette.middleware import Middleware

    return [Middleware(SessionKeyMiddleware)]
