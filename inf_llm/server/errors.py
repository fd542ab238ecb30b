"""One error body for every failure: `{"error": {"message", "type", "param", "code"}}` with the right status.

Owns: the HTTP-only error classes (401, 413, 404), the conversion of InfLLMError / validation errors /
Starlette HTTP errors / bugs into that body, and the exception handlers installed by the app factory.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inf_llm.engine.events import Error
from inf_llm.engine.worker import RETRY_AFTER_SECONDS
from inf_llm.errors import InfLLMError, NotReadyError, QueueFullError

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


def error_payload(message: str, type_: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(message, type_, status, param), status_code=status, headers=headers)


def retry_headers(status: int) -> dict[str, str] | None:
    if status == QueueFullError.http_status:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if status == NotReadyError.http_status:
        return {"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)}
    if status == AuthenticationError.http_status:
        return {"WWW-Authenticate": "Bearer"}
    return None


def from_exception(exc: InfLLMError) -> JSONResponse:
    status = exc.http_status
    return error_response(status, str(exc) or type(exc).__name__, exc.error_type, headers=retry_headers(status))


def from_event(event: Error) -> JSONResponse:
    """A job's Error event as a response (when no byte of the response was sent yet)."""
    return error_response(event.status, event.message, event.type, event.param, retry_headers(event.status))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors():
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        first_param = first_param or param
        if err.get("type") == "missing":
            parts.append(f"{param}: field required")
        else:
            parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts) or "invalid request", first_param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InfLLMError)
    async def _inf_llm_error(request: Request, exc: InfLLMError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("request %s: %s", _rid(request), exc)
        return from_exception(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", _rid(request))
        return error_response(500, f"internal error ({type(exc).__name__})", "internal_error")


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")
