"""Access policies: one TOML file a policy in policies/, the file name its name.

A policy names the operations a caller may perform, the key purposes it may
use, and the ``client_id``s and audiences it may assert.  ``"*"`` means any;
``"$client_id"`` stands for the configured ``[keyd] client_id``; audience
entries are shell-style patterns (``https://*.paynet.my/*``).

The scope binds every door that signs: whatever keyd signs as ``iss`` or
``sub`` (JWT claims, a JSON-object JWS payload, extra protected headers, the
``iss`` of a message signature) must be one of the policy's client_ids, and
every ``aud`` one of its audiences.  Otherwise a policy limited to its own
client_id could mint a ``private_key_jwt`` for anyone through ``sign/jws``.
And a payload shaped like a client assertion (``iss`` = ``sub``, ``aud``,
``exp``) needs the ``client_assertion`` operation, whichever door it uses.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from keyd.config import one_of
from keyd.errors import BadRequest, ConfigError, Forbidden
from keyd.model import Purpose

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class Operation(StrEnum):
    SIGN = "sign"  # JWS and JWT
    CLIENT_ASSERTION = "client_assertion"
    DECRYPT = "decrypt"
    VERIFY = "verify"  # verify, unwrap's signature check, universal links
    ADMIN = "admin"  # key listing, CSR, certificate import, rotate, revoke


@dataclass(frozen=True)
class Policy:
    name: str
    operations: frozenset[Operation]
    purposes: frozenset[Purpose]
    client_ids: frozenset[str]  # "*" for any
    audiences: tuple[str, ...]  # fnmatch patterns

    def require(self, operation: Operation, purpose: Purpose | None = None) -> None:
        if operation not in self.operations:
            raise Forbidden(
                f"policy {self.name!r} does not allow the {operation.value!r} operation"
            )
        if purpose is not None and purpose not in self.purposes:
            raise Forbidden(f"policy {self.name!r} does not allow the {purpose.value!r} key")

    def require_client_id(self, client_id: str) -> None:
        if "*" not in self.client_ids and client_id not in self.client_ids:
            raise Forbidden(f"policy {self.name!r} may not assert client_id {client_id!r}")

    def require_audience(self, audience: str) -> None:
        # fnmatchcase: an audience is a URL, case matters and no OS rules apply.
        if not any(fnmatch.fnmatchcase(audience, pattern) for pattern in self.audiences):
            raise Forbidden(f"policy {self.name!r} may not assert audience {audience[:200]!r}")

    def require_scope(self, members: Mapping[str, Any], where: str) -> None:
        """``iss``/``sub`` in ``members`` are client_ids this policy may assert,
        every ``aud`` an audience it may assert (400 when they are not strings)."""
        for name in ("iss", "sub"):
            if name in members:
                value = members[name]
                if not isinstance(value, str):
                    raise BadRequest(f"{where} {name} must be a string")
                self.require_client_id(value)
        if "aud" in members:
            aud = members["aud"]
            audiences = [aud] if isinstance(aud, str) else aud
            if (not isinstance(audiences, list) or not audiences
                    or not all(isinstance(a, str) for a in audiences)):
                raise BadRequest(f"{where} aud must be a string or a non-empty list of strings")
            for audience in audiences:
                self.require_audience(audience)

    def require_signable(self, claims: Mapping[str, Any], where: str) -> None:
        """The scope check for claims keyd is about to sign, plus the
        ``client_assertion`` operation for anything shaped like one."""
        self.require_scope(claims, where)
        if looks_like_client_assertion(claims):
            self.require(Operation.CLIENT_ASSERTION, Purpose.SIGNING)


def looks_like_client_assertion(claims: Mapping[str, Any]) -> bool:
    """RFC 7523 client authentication: ``iss`` = ``sub``, an ``aud`` and an ``exp``."""
    iss = claims.get("iss")
    return isinstance(iss, str) and iss == claims.get("sub") and "aud" in claims and (
        "exp" in claims)


def _strings(data: dict[str, object], key: str, where: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return value


def parse_policy(name: str, data: dict[str, object], client_id: str, where: str) -> Policy:
    unknown = set(data) - {"description", "operations", "purposes", "client_ids", "audiences"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    ops = _strings(data, "operations", where)
    purposes = _strings(data, "purposes", where)
    for key, given, enum in (("operations", ops, Operation), ("purposes", purposes, Purpose)):
        valid = [m.value for m in enum]
        if bad := [v for v in given if v != "*" and v not in valid]:
            raise ConfigError(f"{where}: {key}: {bad[0]!r} is not {one_of(['*', *valid])}")
    operations = frozenset(Operation) if "*" in ops else frozenset(Operation(o) for o in ops)
    purpose_set = (
        frozenset(Purpose) if "*" in purposes else frozenset(Purpose(p) for p in purposes)
    )
    client_ids = frozenset(
        client_id if c == "$client_id" else c for c in _strings(data, "client_ids", where)
    )
    return Policy(
        name=name,
        operations=operations,
        purposes=purpose_set,
        client_ids=client_ids,
        audiences=tuple(_strings(data, "audiences", where)),
    )


def load_policies(directory: Path, client_id: str) -> dict[str, Policy]:
    if not directory.is_dir():
        raise ConfigError(f"policies directory {directory} not found")
    policies: dict[str, Policy] = {}
    for path in sorted(directory.glob("*.toml")):
        name = path.stem
        if not _NAME.match(name):
            raise ConfigError(f"policy file {path}: {name!r} is not a valid policy name")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"policy file {path} cannot be read: {e}") from None
        policies[name] = parse_policy(name, data, client_id, f"policy file {path}")
    if not policies:
        raise ConfigError(f"policies directory {directory} holds no *.toml policy")
    return policies
