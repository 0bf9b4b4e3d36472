"""Every error the API answers is JSON {"error": code, "detail": sentence}."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from keyd.errors import KeydError, Retryable, Unauthorized

log = logging.getLogger("keyd.api")

UNAVAILABLE_RETRY_AFTER = 5  # seconds, for a 503 whose error names no better time

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, detail: str, retry_after: int | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if retry_after is not None:
        extra["Retry-After"] = str(retry_after)
    return JSONResponse({"error": code, "detail": detail}, status_code=status,
                        headers=extra or None)


def keyd_error(error: KeydError) -> Response:
    retry_after = None
    if isinstance(error, Retryable):
        retry_after = error.retry_after
    elif error.status == 503:
        # Every 503 says when to come back (a key missing from the backend is
        # replaced by the leader's next recovery tick).
        retry_after = UNAVAILABLE_RETRY_AFTER
    # RFC 6750 3: a 401 names the scheme the caller should use.
    headers = {"WWW-Authenticate": 'Bearer realm="keyd"'} if isinstance(
        error, Unauthorized) else None
    return error_response(error.status, error.code, error.detail, retry_after, headers)


async def handle_keyd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KeydError)
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.detail)
    return keyd_error(exc)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    where = f"{request.method} {request.url.path[:100]}"
    if exc.status_code == 404:
        detail = f"no such call: {where}"
    elif exc.status_code == 405:
        detail = f"{where} is not allowed; this path takes {(exc.headers or {}).get('Allow', '')}"
    else:
        detail = str(exc.detail)
    return error_response(exc.status_code, code, detail, headers=exc.headers)


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
