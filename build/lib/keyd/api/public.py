"""The public listener: what PayNet and other participants fetch.

Only the JWKS and /healthz are served here.  The JWKS is read from the store
(a cached, content-addressed document), never from the backend, so it keeps
being served while Vault or the HSM is down.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyd.api.errors import EXCEPTION_HANDLERS, error_response
from keyd.service import KeyService


def create_public_app(service: KeyService) -> Starlette:
    cache_control = f"public, max-age={service.settings.public.max_age}"

    async def jwks(request: Request) -> Response:
        body, etag = await run_in_threadpool(service.jwks)
        headers = {"ETag": etag, "Cache-Control": cache_control}
        if etag in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request) -> Response:
        return error_response(404, "not_found", "only the JWKS is served here")

    return Starlette(
        routes=[
            Route("/jwks", jwks, methods=["GET", "HEAD"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET", "HEAD"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", not_found, methods=["GET", "HEAD", "POST", "PUT", "DELETE",
                                                     "PATCH", "OPTIONS"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
