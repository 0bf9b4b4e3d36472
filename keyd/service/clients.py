"""Local-API clients: added and revoked by admins, authenticated by token hash."""

from __future__ import annotations

import hmac
import secrets
import time
from datetime import datetime

from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.errors import BadRequest, Conflict, KeydError, NotFound, Unauthorized
from keyd.store import audit as audit_sql
from keyd.store import queries

from .core import ServiceCore
from .publication import KEY_CACHE_SECONDS
from .values import Caller, ClientInfo, hash_token, maybe_utc, rfc3339


class Clients(ServiceCore):
    def add_client(self, name: str, policy: str, *, actor: str) -> str:
        """A new client; its bearer token is returned once and only its hash kept."""
        if policy not in self.policies:
            raise BadRequest(f"no policy {policy!r}; have {sorted(self.policies)}")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise BadRequest(f"client name {name!r}: use 1-64 letters, digits, '-' or '_'")
        token = "keyd_" + secrets.token_urlsafe(32)
        with self.store.session() as session:
            if queries.client_by_name(session, name) is not None:
                raise Conflict(f"client {name!r} already exists")
            queries.add_client(session, name, policy, hash_token(token), self.clock.now())
            self.audit.record(
                AuditEvent(actor=actor, action="client.add", detail={"client": name,
                                                                     "policy": policy})
            )
        return token

    def clients(self) -> list[ClientInfo]:
        """Every client, revoked ones too (never a token or its hash)."""
        with self.store.session() as session:
            return [ClientInfo(c.name, c.policy, utc(c.created_at), maybe_utc(c.revoked_at))
                    for c in queries.all_clients(session)]

    def clients_last_seen(self, names: list[str], window: int) -> dict[str, datetime]:
        """When each named client last acted, from the newest ``window`` audit
        events (a bounded read: older activity is not looked for)."""
        with self.store.session("console read") as session:
            seen = audit_sql.last_seen(session, names, window)
        return {name: utc(at) for name, at in seen.items()}

    def revoke_client(self, name: str, *, actor: str) -> None:
        """Revoke a client: its token is refused from now on (401)."""
        if not 1 <= len(name) <= 64 or "\x00" in name:  # no client has such a name
            raise NotFound(f"no client {name[:64]!r}")
        with self.store.session("revoke client", write=True) as session:
            client = queries.client_by_name(session, name)
            if client is None:
                raise NotFound(f"no client {name[:64]!r}")
            if client.revoked_at is not None:
                raise Conflict(f"client {name!r} was revoked at {rfc3339(client.revoked_at)}")
            client.revoked_at = self.clock.now()
            session.add(client)
            self.audit.record(AuditEvent(actor=actor, action="client.revoke",
                                         detail={"client": name, "policy": client.policy}))
        self._clients.clear()  # no cached caller outlives its revocation here

    def caller_named(self, name: str) -> Caller:
        """The caller behind a client name (a console session), or 401 when it is
        unknown, revoked or its policy is gone."""
        with self.store.session() as session:
            client = queries.client_by_name(session, name)
            if client is None or client.revoked_at is not None:
                raise Unauthorized(f"client {name[:64]!r} is unknown or revoked")
            policy = self.policies.get(client.policy)
            if policy is None:
                raise Unauthorized(f"client {client.name!r} has unknown policy {client.policy!r}")
            return Caller(client.name, policy)

    def authenticate(self, token: str | None) -> Caller:
        """The caller a bearer token belongs to, or 401.

        The lookup is by hash, so no secret-dependent comparison happens on
        the token itself; the hash comparison below is constant-time anyway.
        """
        if not token:
            raise Unauthorized("a bearer token is required")
        cached = self.cached_caller(token)
        if cached is not None:
            return cached
        digest = hash_token(token)
        with self.store.session() as session:
            client = queries.client_by_token_hash(session, digest)
            if (
                client is None
                or client.revoked_at is not None
                or not hmac.compare_digest(client.token_hash, digest)
            ):
                raise Unauthorized("the bearer token is not valid")
            policy = self.policies.get(client.policy)
            if policy is None:
                raise Unauthorized(f"client {client.name!r} has unknown policy {client.policy!r}")
            caller = Caller(client.name, policy)
        self._clients[digest] = (caller, time.monotonic())
        return caller

    def cached_caller(self, token: str | None) -> Caller | None:
        """The caller of ``token`` if it was authenticated within the cache
        bound, else None (then ``authenticate``, which may read the store)."""
        if not token:
            return None
        cached = self._clients.get(hash_token(token))
        if cached is not None and time.monotonic() - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
        return None

    def admin_caller(self) -> Caller:
        """The CLI acts with the admin policy: it runs as the operator on the host."""
        policy = self.policies.get("admin")
        if policy is None:
            raise KeydError("no 'admin' policy in policies/")
        return Caller("cli", policy)
