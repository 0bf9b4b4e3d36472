"""Admin calls of the local API: key listing, CSRs, certificate import.

They need a caller whose policy allows the ``admin`` operation (the shipped
``admin`` policy); a ``service`` client gets 403, before its body is read.
The action calls (rotate, revoke) take an empty body: a revocation without a
``reason`` records who revoked through the API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import Route

from keyd.errors import BadRequest
from keyd.model import Purpose
from keyd.policy import Operation
from keyd.service import Caller, KeyService

Body = dict[str, Any]
Params = dict[str, str]


def routes(service: KeyService, endpoint: Callable[..., Any], limit: int) -> list[Route]:
    def list_keys(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        caller.policy.require(Operation.ADMIN)
        return {"keys": [k.to_json() for k in service.keys()]}

    def get_csr(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        caller.policy.require(Operation.ADMIN)
        return {"csr": service.csr(params["kid"], actor=caller.name)}

    def put_certificate(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        caller.policy.require(Operation.ADMIN)
        pem = body.get("certificate")
        if not isinstance(pem, str) or not pem:
            raise BadRequest("certificate must be the PEM chain, leaf first")
        assigned = body.get("kid")
        if assigned is not None and not isinstance(assigned, str):
            raise BadRequest("kid must be a string")
        info, warnings = service.import_certificate(
            params["kid"], pem.encode(), actor=caller.name, assigned_kid=assigned
        )
        return {"key": info.to_json(), "warnings": warnings}

    def rotate(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        caller.policy.require(Operation.ADMIN)
        try:
            purpose = Purpose(params["purpose"])
        except ValueError:
            raise BadRequest(f"no purpose {params['purpose'][:40]!r}") from None
        now = body.get("now", False)
        if not isinstance(now, bool):
            raise BadRequest("now must be true or false")
        info = service.rotate(purpose, actor=caller.name, now=now)
        return {"key": info.to_json()}

    def revoke(caller: Caller, body: Body, params: Params) -> dict[str, Any]:
        caller.policy.require(Operation.ADMIN)
        reason = body.get("reason", f"revoked through the local API by {caller.name}")
        if not isinstance(reason, str):
            raise BadRequest("reason must be a string")
        info, replacement = service.revoke(params["kid"], reason=reason, actor=caller.name)
        return {"key": info.to_json(),
                "replacement": None if replacement is None else replacement.to_json()}

    admin = [(Operation.ADMIN, None)]
    return [
        Route("/v1/keys", endpoint("admin.keys", list_keys, requires=admin, fields=None),
              methods=["GET"]),
        Route("/v1/keys/{purpose:str}/rotate", endpoint(
            "admin.rotate", rotate, requires=admin, fields=["now"], action=True),
            methods=["POST"]),
        Route("/v1/keys/{kid:str}/revoke", endpoint(
            "admin.revoke", revoke, requires=admin, fields=["reason"], action=True),
            methods=["POST"]),
        Route("/v1/keys/{kid:str}/csr", endpoint("admin.csr", get_csr, requires=admin,
                                                 fields=None), methods=["GET"]),
        Route("/v1/keys/{kid:str}/certificate", endpoint(
            "admin.certificate", put_certificate, requires=admin,
            fields=["certificate", "kid"]), methods=["PUT"]),
    ]
