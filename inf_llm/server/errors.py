"""One error body for every failure: `{"error": {"message", "type", "param", "code"}}` with the right status.

Owns: the HTTP-only error classes (401, 404, 413, 415, 429 per client, server limits), the conversion of
InfLLMError / validation errors / Starlette HTTP errors into that body, and the exception handlers installed by
the app factory (bugs are answered by middleware.InternalErrors, which keeps the connection open).
"""

from __future__ import annotations

import email.message
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inf_llm.engine.events import Error
from inf_llm.engine.worker import RETRY_AFTER_SECONDS
from inf_llm.errors import InfLLMError, NotReadyError, RequestError

log = logging.getLogger(__name__)

# Seconds a client should wait before asking again while the model loads.
LOADING_RETRY_AFTER_SECONDS = 5


class AuthenticationError(InfLLMError):
    """The server has an API key and the request carries none or another one."""

    http_status = 401
    error_type = "authentication_error"


class BodyTooLargeError(InfLLMError):
    http_status = 413
    error_type = "request_too_large"


class RequestFieldError(RequestError):
    """A request field asks for what this server does not do or allows no more of (400, `param` names it)."""

    def __init__(self, message: str, param: str | None, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.param = param
        self.error_type = error_type


class ClientLimitError(InfLLMError):
    """One client address has server.max_client_requests requests in flight already."""

    http_status = 429
    error_type = "too_many_requests"


class ModelNameError(InfLLMError):
    """An OpenAI request names a model this server does not serve (vLLM's answer: 404)."""

    http_status = 404
    error_type = "model_not_found"

    def __init__(self, name: str):
        super().__init__(f"The model `{printable(name)}` does not exist.")
        self.param = "model"


# Pydantic error types (raised by protocol.py) that are a 400 rather than the 422 of other validation errors.
BAD_REQUEST_ERROR_TYPES = frozenset({"invalid_unicode", "unsupported_field"})


def printable(text: str) -> str:
    """`text` with lone surrogates written as \\udxxx escapes: a body that holds one cannot be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(message: str, type_: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": printable(message), "type": type_,
                      "param": None if param is None else printable(param), "code": status}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(message, type_, status, param), status_code=status, headers=headers)


def retry_headers(status: int) -> dict[str, str] | None:
    if status == 429:  # queue full or a client's limit: one answer's worth
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if status == NotReadyError.http_status:
        return {"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)}
    if status == AuthenticationError.http_status:
        return {"WWW-Authenticate": "Bearer"}
    return None


def from_exception(exc: InfLLMError) -> JSONResponse:
    status = exc.http_status
    return error_response(status, str(exc) or type(exc).__name__, exc.error_type, getattr(exc, "param", None),
                          retry_headers(status))


def from_event(event: Error) -> JSONResponse:
    """A job's Error event as a response (when no byte of the response was sent yet)."""
    return error_response(event.status, event.message, event.type, event.param, retry_headers(event.status))


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param) of a validation error: 400 for the types of BAD_REQUEST_ERROR_TYPES (the first
    such error alone), else 422 with every error."""
    errors = exc.errors()
    for err in errors:
        if err.get("type") in BAD_REQUEST_ERROR_TYPES:
            return 400, err["msg"], err.get("ctx", {}).get("param")
    parts = []
    first_param = None
    for err in errors:
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
            continue
        if tuple(err.get("loc", ())) == ("body",):  # the whole body: null, a list, a string...
            parts.append(f"the request body must be a JSON object, not {_json_kind(err.get('input'))}")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        first_param = first_param or param
        if err.get("type") == "missing":
            parts.append(f"{param}: field required")
        else:
            parts.append(f"{param}: {msg}" if param else msg)
    return 422, "; ".join(parts) or "invalid request", first_param


def _json_kind(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "a boolean"), (str, "a string"), (list, "an array"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "that"


def _json_content_type(value: str | None) -> bool:
    """FastAPI's rule for a JSON body: application/json or application/*+json."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def _body_problem(request: Request, exc: RequestValidationError) -> JSONResponse | None:
    """An empty body or one that is not JSON by its Content-Type: FastAPI reports a missing or non-object body,
    which says nothing of the cause."""
    if not any(tuple(err.get("loc", ())) == ("body",) for err in exc.errors()):
        return None
    content_type = request.headers.get("content-type")
    if not await request.body():
        return error_response(400, "the request body is empty: send a JSON object with Content-Type: "
                              "application/json", "invalid_request_error")
    if not _json_content_type(content_type):
        got = f"got {content_type!r}" if content_type else "the request has none"
        return error_response(415, f"the body must be JSON with Content-Type: application/json ({got})",
                              "unsupported_media_type")
    return None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InfLLMError)
    async def _inf_llm_error(request: Request, exc: InfLLMError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("request %s: %s", _rid(request), exc)
        return from_exception(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = await _body_problem(request, exc)
        if problem is not None:
            return problem
        status, message, param = _validation_message(exc)
        return error_response(status, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
            return error_response(400, f"the body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                                  f"offset {cause.start}): send JSON encoded as UTF-8", "invalid_request_error")
        kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")
