"""The local API: participant services sign, decrypt and verify through keyd.

Reachable over loopback TCP and the unix socket, always with a bearer token.
Handlers parse and shape JSON only; each one hands its whole call (token
check, policy, RSA operation, audit) to a worker thread, so the event loop
never waits on the backend and both cores do RSA work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyd.api import admin
from keyd.api.errors import EXCEPTION_HANDLERS, error_response
from keyd.api.limits import RateLimiter
from keyd.api.openapi import document
from keyd.errors import BadRequest, KeydError, PayloadTooLarge, RequestTimeout, Unauthorized
from keyd.metrics import Metrics
from keyd.service import Caller, KeyService
from keyd.tokens import CLIENT_ASSERTION_TYPE, TokenService

Body = dict[str, Any]
WORKER_THREADS = 32  # RSA releases the GIL: enough threads to keep both cores signing
Params = dict[str, str]


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_field(body: Body, name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str) or not value or any(c in value for c in "=+/ \n"):
        raise BadRequest(f"{name} must be base64url without padding")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name} is not valid base64url") from None


def str_field(body: Body, name: str, *, required: bool = True, limit: int = 1 << 20) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise PayloadTooLarge(f"{name} is longer than {limit} characters")
    return value


def bool_field(body: Body, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def with_plaintext(answer: dict[str, Any], name: str, data: bytes) -> dict[str, Any]:
    """``answer`` plus ``data`` as base64url under ``name``, and as ``payload`` if JSON."""
    answer[name] = b64u(data)
    try:
        answer["payload"] = json.loads(data)
    except (ValueError, RecursionError):
        pass  # not JSON: the base64url form is the whole answer
    return answer


async def read_json(request: Request, limit: int, deadline: float) -> Body:
    """The request body as a JSON object, refused with 413 past ``limit`` bytes.

    Content-Length is checked first, then the stream is counted, so a lying
    Content-Length cannot make us buffer more than the limit; a body that
    trickles in slower than ``deadline`` seconds is refused with 408.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"request body over {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {deadline:g} s") from None
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise PayloadTooLarge("request body nests JSON too deeply") from None
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


Operation = Callable[[Caller, Body, Params], dict[str, Any]]


def create_local_app(service: KeyService, metrics: Metrics) -> Starlette:
    tokens = TokenService(service)
    # A plain executor, not anyio's to_thread: on the hot path its cancel
    # scopes and capacity limiter cost the event loop more than the hop itself.
    workers = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="keyd-op")
    limit = service.settings.api.max_body
    body_timeout = service.settings.api.body_timeout.total_seconds()
    limiter = RateLimiter(service.settings.api.rate_limit, service.settings.api.rate_burst)

    def endpoint(name: str, operation: Operation, *, has_body: bool = True
                 ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap an operation: read the body, then token + work in one thread hop."""

        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            outcome = "error"
            try:
                body = await read_json(request, limit, body_timeout) if has_body else {}
                params = dict(request.path_params)
                token = bearer(request)

                def call() -> dict[str, Any]:
                    try:
                        caller = service.authenticate(token)
                    except Unauthorized as e:
                        tokens.refuse(None, name, e)
                        raise
                    limiter.take(caller.name)
                    try:
                        return operation(caller, body, params)
                    except KeydError as e:
                        if 400 <= e.status < 500:
                            tokens.refuse(caller, name, e)
                        raise

                result = await asyncio.get_running_loop().run_in_executor(workers, call)
                outcome = "ok"
                return JSONResponse(result)
            except KeydError as e:
                outcome = e.code
                raise
            finally:
                metrics.requests.labels(name, outcome).inc()
                metrics.latency.labels(name).observe(time.perf_counter() - started)

        return handle

    def sign_jws(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        if "payload_b64" in body:
            payload = b64u_field(body, "payload_b64")
        elif "payload" in body:
            payload = json.dumps(body["payload"], separators=(",", ":"),
                                 ensure_ascii=False).encode()
        else:
            raise BadRequest("give payload (any JSON) or payload_b64")
        header = body.get("header")
        if header is not None and not isinstance(header, dict):
            raise BadRequest("header must be a JSON object")
        signed = tokens.sign_jws(
            caller, payload, header=header, detached=bool_field(body, "detached"),
            claims_in_header=bool_field(body, "claims_in_header"),
        )
        return {"jws": signed.token, "kid": signed.kid}

    def sign_jwt(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        claims = body.get("claims")
        if not isinstance(claims, dict):
            raise BadRequest("claims must be a JSON object")
        ttl = body.get("ttl", 600)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise BadRequest("ttl must be an integer number of seconds")
        signed = tokens.sign_jwt(caller, claims, ttl)
        return {"jwt": signed.token, "kid": signed.kid}

    def client_assertion(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        audience = str_field(body, "audience", limit=2048)
        client_id = str_field(body, "client_id", required=False, limit=256)
        assert audience is not None
        signed = tokens.client_assertion(caller, audience, client_id)
        return {
            "client_assertion": signed.token,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "kid": signed.kid,
        }

    def decrypt_jwe(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        compact = str_field(body, "jwe", limit=limit)
        assert compact is not None
        result = tokens.decrypt_jwe(caller, compact)
        answer = {"kid": result.kid, "header": result.header}
        return with_plaintext(answer, "plaintext_b64", result.plaintext)

    def verify_jws(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        compact = str_field(body, "jws", limit=limit)
        issuer = str_field(body, "issuer", limit=128)
        payload_b64 = str_field(body, "payload_b64", required=False, limit=limit)
        assert compact is not None and issuer is not None
        result = tokens.verify_jws(caller, compact, issuer, payload_b64)
        answer = {"valid": True, "header": result.header, "kid": result.kid}
        return with_plaintext(answer, "payload_b64", result.payload)

    def unwrap(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        compact = str_field(body, "jws", limit=limit)
        issuer = str_field(body, "issuer", limit=128)
        assert compact is not None and issuer is not None
        verified, decrypted = tokens.unwrap(caller, compact, issuer)
        answer = {"kid": decrypted.kid, "signer_kid": verified.kid}
        return with_plaintext(answer, "plaintext_b64", decrypted.plaintext)

    def universal_link(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        url = str_field(body, "url", limit=8192)
        issuer = str_field(body, "issuer", required=False, limit=128) or "paynet"
        assert url is not None
        consent_id, verified = tokens.verify_universal_link(caller, url, issuer)
        return {"valid": True, "consent_id": consent_id, "signer_kid": verified.kid}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(service.ready)
        return JSONResponse(checks, status_code=200 if checks["ready"] else 503)

    async def metrics_endpoint(request: Request) -> Response:
        keys = await run_in_threadpool(service.keys)
        metrics.observe_keys([
            (k.purpose, k.state, k.kid or k.id,
             None if k.not_after is None else k.not_after.timestamp())
            for k in keys
        ])
        metrics.observe_rotations(service.rotation_counts(keys))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    openapi = JSONResponse(document())

    async def openapi_json(request: Request) -> Response:
        return openapi

    async def not_found(request: Request) -> Response:
        return error_response(404, "not_found", f"no such call: {request.method} "
                                                f"{request.url.path[:100]}")

    routes = [
        Route("/v1/sign/jws", endpoint("sign.jws", sign_jws), methods=["POST"]),
        Route("/v1/sign/jwt", endpoint("sign.jwt", sign_jwt), methods=["POST"]),
        Route("/v1/client-assertion", endpoint("client_assertion", client_assertion),
              methods=["POST"]),
        Route("/v1/decrypt/jwe", endpoint("decrypt.jwe", decrypt_jwe), methods=["POST"]),
        Route("/v1/verify/jws", endpoint("verify.jws", verify_jws), methods=["POST"]),
        Route("/v1/unwrap", endpoint("unwrap", unwrap), methods=["POST"]),
        Route("/v1/verify/universal-link", endpoint("verify.universal_link", universal_link),
              methods=["POST"]),
        *admin.routes(service, endpoint, limit),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
