"""The local API: participant services sign, decrypt and verify through keyd.

Reachable over loopback TCP and the unix socket, always with a bearer token.
Handlers parse and shape JSON only; each one hands its whole call (token
check, policy, RSA operation, audit) to a worker thread, so the event loop
never waits on the backend and both cores do RSA work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyd.api import admin
from keyd.api.body import read_bytes
from keyd.api.errors import EXCEPTION_HANDLERS
from keyd.api.limits import RateLimiter, SharedBuckets
from keyd.api.openapi import document
from keyd.audit import AuditEvent
from keyd.console import console_routes
from keyd.errors import (
    BadRequest,
    IssuerUnavailable,
    KeydError,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from keyd.issuers import FetchPending, defer_fetches
from keyd.jose.compact import (
    MAX_CONTENT_NESTING,
    b64u_decode,
    b64u_encode,
    read_content,
    show,
    strict_json,
)
from keyd.metrics import Metrics
from keyd.model import Purpose
from keyd.policy import Operation as PolicyOperation
from keyd.service import Caller, KeyService
from keyd.tokens import CLIENT_ASSERTION_TYPE, TokenService

log = logging.getLogger("keyd.api")

Body = dict[str, Any]
WORKER_THREADS = 32  # RSA releases the GIL: enough threads to keep both cores signing
Params = dict[str, str]
Requirement = tuple[PolicyOperation, Purpose | None]


def b64u_field(body: Body, name: str) -> bytes:
    """A ``*_b64`` member, through the one strict base64url decoder of keyd.jose."""
    return b64u_decode(body.get(name), BadRequest, name)  # type: ignore[arg-type]


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


def with_content(answer: dict[str, Any], name: str, data: bytes, what: str) -> dict[str, Any]:
    """``answer`` plus ``data`` as base64url under ``name`` (always), and as
    ``payload`` only when the strict reader takes it; else ``payload_error``
    says why.  Hostile content (NaN, 1e999, a lone surrogate, duplicate
    members) can therefore never reach, let alone break, the JSON encoder."""
    answer[name] = b64u_encode(data)
    value, why = read_content(data, what)
    if why is None:
        answer["payload"] = value
    else:
        answer["payload_error"] = why
    return answer


def _is_json(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return False
    charset = params.strip().lower().removeprefix("charset=").strip('"')
    return not params.strip() or charset in ("utf-8", "utf8")


def parse_body(raw: bytes, fields: frozenset[str]) -> Body:
    """A JSON object by the one strict reader, holding only ``fields``."""
    body = strict_json(raw, "the request body", BadRequest, depth=MAX_CONTENT_NESTING,
                       too_deep=PayloadTooLarge)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        # A misspelt "detatched" must not quietly give an attached JWS.
        raise BadRequest(
            f"unknown member{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(show(u, 40) for u in unknown[:5])}; this call takes "
            f"{', '.join(sorted(fields)) or 'no members'}"
        )
    return body


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


Operation = Callable[[Caller, Body, Params], dict[str, Any]]


@dataclass(frozen=True)
class Shape:
    """What a call needs to know before it reads a body."""

    requires: tuple[Requirement, ...]  # checked against the policy first
    fields: frozenset[str] | None  # the members it takes; None: it reads no body
    action: bool  # an empty body is fine (rotate, revoke)


def create_local_app(service: KeyService, metrics: Metrics,
                     buckets: SharedBuckets | None = None) -> Starlette:
    tokens = TokenService(service)
    # A plain executor, not anyio's to_thread: on the hot path its cancel
    # scopes and capacity limiter cost the event loop more than the hop itself.
    workers = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="keyd-op")
    limit = service.settings.api.max_body
    body_timeout = service.settings.api.body_timeout.total_seconds()
    # ``buckets``: the table every worker of this daemon shares (one limit per client).
    limiter = RateLimiter(service.settings.api.rate_limit, service.settings.api.rate_burst,
                          buckets)

    def admit(token: str | None, name: str) -> Caller:
        try:
            return service.authenticate(token)
        except Unauthorized as e:
            tokens.refuse(None, name, e)
            raise

    async def read_request(request: Request, shape: Shape) -> bytes | None:
        """The raw body to parse, or None when the call takes none (or an
        action call came without one)."""
        if shape.fields is None:
            return None
        if not _is_json(request.headers.get("content-type", "")):
            # An action call may come with no body at all; anything else
            # must say it is JSON (text/plain is not quietly taken as JSON).
            if shape.action and not await read_bytes(request, limit, body_timeout):
                return None
            raise UnsupportedMediaType("the request body must be Content-Type: application/json")
        raw = await read_bytes(request, limit, body_timeout)
        return None if shape.action and not raw else raw

    def endpoint(
        name: str,
        operation: Operation,
        *,
        requires: Iterable[Requirement] = (),
        fields: Iterable[str] | None = (),
        action: bool = False,
        has_body: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap an operation: the caller and its policy first, then the body,
        then the work, its audit and the rendering of the answer in one hop."""
        shape = Shape(tuple(requires), None if fields is None or not has_body
                      else frozenset(fields), action)

        def work(caller: Caller, raw: bytes | None, params: Params) -> bytes:
            try:
                # Parsed here, off the event loop: a megabyte of JSON costs the
                # strict reader tens of milliseconds.
                body = {} if raw is None or shape.fields is None else parse_body(
                    raw, shape.fields)
                with defer_fetches():
                    answer = operation(caller, body, params)
            except KeydError as e:
                if 400 <= e.status < 500:
                    tokens.refuse(caller, name, e)
                raise
            try:
                return json.dumps(answer, ensure_ascii=False, allow_nan=False,
                                  separators=(",", ":")).encode("utf-8")
            except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
                # Cannot happen for content from the strict reader; if it does,
                # the audit must say the caller got an error, not the result.
                service.record(AuditEvent(actor=caller.name, action=name, outcome="error",
                                          detail={"error": "internal_error",
                                                  "status": 500}))
                raise RuntimeError(f"answer of {name} not serialisable") from e

        # The labelled children looked up once, not twice a request.
        latency = metrics.latency.labels(name)
        counted: dict[str, Any] = {}

        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            outcome = "error"
            loop = asyncio.get_running_loop()
            try:
                token = bearer(request)
                caller = service.cached_caller(token)
                if caller is None:
                    caller = await loop.run_in_executor(workers, admit, token, name)
                limiter.take(caller.name)  # a flood is not audited event by event
                try:
                    for operation_, purpose in shape.requires:
                        caller.policy.require(operation_, purpose)
                    raw = await read_request(request, shape)
                except KeydError as e:
                    if 400 <= e.status < 500:
                        await loop.run_in_executor(workers, tokens.refuse, caller, name, e)
                    raise
                params = dict(request.path_params)
                deadline: float | None = None
                while True:
                    try:
                        data = await loop.run_in_executor(workers, work, caller, raw, params)
                        break
                    except FetchPending as pending:
                        # An issuer's JWKS is being fetched: wait for it here,
                        # on the loop, so no worker thread is parked on a slow
                        # issuer; then try again.  At most fetch_timeout in all.
                        deadline = deadline or loop.time() + pending.timeout
                        try:
                            await asyncio.wait_for(
                                asyncio.shield(asyncio.wrap_future(pending.future)),
                                max(0.0, deadline - loop.time()))
                        except TimeoutError:
                            raise IssuerUnavailable(
                                f"issuer {pending.issuer}: the JWKS fetch did not finish "
                                f"within {pending.timeout:g} s") from None
                outcome = "ok"
                return Response(data, media_type="application/json")
            except KeydError as e:
                outcome = e.code
                raise
            finally:
                counter = counted.get(outcome)
                if counter is None:
                    counter = counted[outcome] = metrics.requests.labels(name, outcome)
                counter.inc()
                latency.observe(time.perf_counter() - started)

        return handle

    def sign_jws(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        if ("payload_b64" in body) == ("payload" in body):
            raise BadRequest("give exactly one of payload (any JSON) and payload_b64")
        if "payload_b64" in body:
            payload = b64u_field(body, "payload_b64")
        else:
            # From the strict reader: re-encoding it cannot fail.
            payload = json.dumps(body["payload"], separators=(",", ":"),
                                 ensure_ascii=False).encode()
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
        return with_content(answer, "plaintext_b64", result.plaintext, "the plaintext")

    def verify_jws(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        compact = str_field(body, "jws", limit=limit)
        issuer = str_field(body, "issuer", limit=128)
        payload_b64 = str_field(body, "payload_b64", required=False, limit=limit)
        assert compact is not None and issuer is not None
        result = tokens.verify_jws(caller, compact, issuer, payload_b64)
        answer = {"valid": True, "header": result.header, "kid": result.kid}
        return with_content(answer, "payload_b64", result.payload, "the payload")

    def unwrap(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        compact = str_field(body, "jws", limit=limit)
        issuer = str_field(body, "issuer", limit=128)
        assert compact is not None and issuer is not None
        verified, decrypted = tokens.unwrap(caller, compact, issuer)
        answer = {"kid": decrypted.kid, "signer_kid": verified.kid}
        return with_content(answer, "plaintext_b64", decrypted.plaintext, "the plaintext")

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

    sign = (PolicyOperation.SIGN, Purpose.SIGNING)
    verify = (PolicyOperation.VERIFY, None)
    routes = [
        Route("/v1/sign/jws", endpoint(
            "sign.jws", sign_jws, requires=[sign],
            fields=["payload", "payload_b64", "header", "detached", "claims_in_header"]),
            methods=["POST"]),
        Route("/v1/sign/jwt", endpoint("sign.jwt", sign_jwt, requires=[sign],
                                       fields=["claims", "ttl"]), methods=["POST"]),
        Route("/v1/client-assertion", endpoint(
            "client_assertion", client_assertion,
            requires=[(PolicyOperation.CLIENT_ASSERTION, Purpose.SIGNING)],
            fields=["audience", "client_id"]), methods=["POST"]),
        Route("/v1/decrypt/jwe", endpoint(
            "decrypt.jwe", decrypt_jwe,
            requires=[(PolicyOperation.DECRYPT, Purpose.ENCRYPTION)], fields=["jwe"]),
            methods=["POST"]),
        Route("/v1/verify/jws", endpoint("verify.jws", verify_jws, requires=[verify],
                                         fields=["jws", "issuer", "payload_b64"]),
              methods=["POST"]),
        Route("/v1/unwrap", endpoint(
            "unwrap", unwrap,
            requires=[verify, (PolicyOperation.DECRYPT, Purpose.ENCRYPTION)],
            fields=["jws", "issuer"]), methods=["POST"]),
        Route("/v1/verify/universal-link", endpoint(
            "verify.universal_link", universal_link, requires=[verify],
            fields=["url", "issuer"]), methods=["POST"]),
        *admin.routes(service, endpoint, limit),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        *console_routes(service),  # the admin console at /console (keyd/console/)
    ]
    # No catch-all route: Starlette answers an unknown path with 404 and a
    # known path with the wrong method with 405 and Allow (api/errors.py).
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
