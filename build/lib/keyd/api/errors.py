"""Every error the API answers is JSON {"error": code, "detail": sentence}."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from keyd.errors import (
    BackendUnavailable,
    IssuerUnavailable,
    KeydError,
    RateLimited,
    StoreUnavailable,
)

log = logging.getLogger("keyd.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, detail: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def keyd_error(error: KeydError) -> Response:
    retry_after = None
    if isinstance(error, BackendUnavailable | StoreUnavailable | IssuerUnavailable | RateLimited):
        retry_after = error.retry_after
    return error_response(error.status, error.code, error.detail, retry_after)


async def handle_keyd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KeydError)
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.detail)
    return keyd_error(exc)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # A bug, not an input problem: logged with its type (never request data),
    # answered with a fixed body so nothing internal leaks.
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__,
              exc_info=exc)
    return error_response(500, "internal_error", "keyd failed to handle this request")


EXCEPTION_HANDLERS = {
    KeydError: handle_keyd_error,
    HTTPException: handle_http_error,
    Exception: handle_unexpected,
}
