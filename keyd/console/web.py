"""The console's HTTP hygiene: security headers, cookies, strict form reading.

Every console response carries a Content-Security-Policy that allows only
this origin's own files (no inline script or style, no frames, forms that
post only here), ``X-Frame-Options: DENY`` and ``Cache-Control: no-store``
(a page may show a client's token once; no cache may keep it).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncGenerator
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyd.api.body import read_bytes
from keyd.errors import BadRequest, UnsupportedMediaType

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "object-src 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chrome send Origin: null
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
MAX_FIELDS = 10


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret (CSRF token) with ours."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class SecurityHeaders:
    """ASGI middleware: the headers above on every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_name(request: Request, base: str) -> str:
    """``__Host-`` prefixed over TLS; plain on loopback HTTP.

    Browsers accept a ``__Host-`` cookie only with ``Secure``, and a Secure
    cookie is not sent over plain HTTP: keyd's local listener is loopback
    HTTP by default, so there the cookie goes without the prefix (HttpOnly,
    SameSite=Strict, Path=/console, host-only all the same).
    """
    return f"__Host-{base}" if secure(request) else base


def cookie_header(request: Request, base: str, value: str, max_age: int | None) -> str:
    parts = [f"{cookie_name(request, base)}={value}", "HttpOnly", "SameSite=Strict"]
    # __Host- demands Path=/; the console's own cookies are otherwise scoped to it.
    parts.append("Path=/" if secure(request) else "Path=/console")
    if secure(request):
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def same_origin(request: Request) -> bool:
    """A state-changing request must come from our own pages (beside the CSRF token).

    Browsers send ``Origin`` on every POST and ``Sec-Fetch-Site`` on every
    request; either one naming another site is refused.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    own = f"{request.url.scheme}://{request.url.netloc}"
    return origin == own


async def read_form(request: Request, allowed: set[str], *, limit: int,
                    deadline: float) -> dict[str, str | bytes]:
    """A form's fields: text as str, an uploaded file as bytes.

    Strict like the JSON API: an unknown or repeated field is a 400 that
    names it; only urlencoded and multipart bodies are read (else 415).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_bytes(request, limit, deadline)
    pairs: list[tuple[str, str | bytes]] = []
    if kind == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8", errors="strict")
            parsed = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form is not valid UTF-8 urlencoded data") from None
        pairs.extend(parsed)
    elif kind == "multipart/form-data":
        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        parser = MultiPartParser(Headers(raw=request.headers.raw), stream(), max_files=2,
                                 max_fields=MAX_FIELDS, max_part_size=limit)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise BadRequest(f"the form cannot be read: {e.message}") from None
        for key, item in form.multi_items():
            if isinstance(item, UploadFile):
                data = await item.read()
                await item.close()
                if data or item.filename:  # an empty file input sends no file
                    pairs.append((key, data))
            else:
                pairs.append((key, item))
    else:
        raise UnsupportedMediaType(
            f"a form is urlencoded or multipart, not {kind[:60] or 'nothing'}")
    fields: dict[str, str | bytes] = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadRequest(f"unknown form field {name[:40]!r}")
        if name in fields:
            raise BadRequest(f"form field {name!r} given twice")
        fields[name] = value
    return fields


def text_field(fields: dict[str, str | bytes], name: str, *, required: bool = True,
               limit: int = 256) -> str:
    value = fields.get(name, "")
    if isinstance(value, bytes):
        raise BadRequest(f"{name} must be text, not a file")
    value = value.strip()
    if required and not value:
        raise BadRequest(f"{name} is required")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value
