"""KeyService: the one place that joins backend, store, policy and audit.

The local API, the CLI and the scheduled jobs all call it; none of them talks
to a backend or the store directly.  Token work (sign, decrypt, verify) lives
in keyd/tokens.py and calls back into this class for keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlmodel import Session

from keyd import jose, x509
from keyd.audit import AuditEvent, AuditLog
from keyd.backends import open_backend
from keyd.backends.base import Backend
from keyd.clock import Clock, SystemClock, utc
from keyd.config import Settings
from keyd.errors import (
    BadRequest,
    CertificateError,
    Conflict,
    KeydError,
    NotFound,
    Unauthorized,
)
from keyd.issuers import IssuerKeys
from keyd.model import KeyState, KidScheme, Mode, Purpose
from keyd.policy import Policy, load_policies
from keyd.store import queries
from keyd.store.db import Store
from keyd.store.tables import Certificate, Client, KeyVersion

log = logging.getLogger("keyd.service")

# How long the hot path trusts its cached view of the active keys.  Admin calls
# made through this process invalidate it at once; another process's change
# (the CLI) is seen within this bound.
KEY_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class Caller:
    """An authenticated local-API client (or the CLI acting as admin)."""

    name: str
    policy: Policy


@dataclass(frozen=True)
class UsableKey:
    """What the hot path needs to use a key: no database round-trip."""

    key_id: str
    kid: str
    purpose: Purpose
    state: KeyState
    ref: str


@dataclass(frozen=True)
class KeyInfo:
    """A key version as the CLI and the admin API show it."""

    id: str
    kid: str | None
    purpose: Purpose
    state: KeyState
    alg: str | None
    key_size: int
    backend: str
    created_at: datetime
    not_before: datetime | None
    not_after: datetime | None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kid": self.kid if self.kid is not None else self.id,
            "provisional": self.kid is None,
            "purpose": self.purpose.value,
            "state": self.state.value,
            "alg": self.alg,
            "key_size": self.key_size,
            "backend": self.backend,
            "created_at": _rfc3339(self.created_at),
            "not_before": _rfc3339(self.not_before),
            "not_after": _rfc3339(self.not_after),
        }


def _rfc3339(when: datetime | None) -> str | None:
    return None if when is None else utc(when).isoformat().replace("+00:00", "Z")


def hash_token(token: str) -> str:
    """Client tokens carry 256 random bits, so one SHA-256 is the right hash."""
    return hashlib.sha256(token.encode()).hexdigest()


class KeyService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: Backend,
        audit: AuditLog,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.audit = audit
        self.clock = clock
        self.policies = load_policies(settings.keyd.policies_dir, settings.keyd.client_id)
        self.issuers = {
            name: IssuerKeys(issuer, clock) for name, issuer in settings.issuers.items()
        }
        self._lock = threading.Lock()
        self._usable: dict[str, UsableKey] = {}  # kid -> key, every published key
        self._active: dict[Purpose, UsableKey] = {}
        self._loaded_at = float("-inf")
        self._jwks: tuple[bytes, str] | None = None
        self._clients: dict[str, tuple[Caller, float]] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, settings: Settings, clock: Clock | None = None, *, require_backend: bool = True
    ) -> KeyService:
        """Store migrated to head, backend checked, policies loaded."""
        store = Store(settings.store.url)
        try:
            store.migrate()
            backend = open_backend(settings, require_up=require_backend)
        except BaseException:
            store.close()
            raise
        clock = clock or SystemClock()
        return cls(settings, store, backend, AuditLog(store, clock), clock)

    def close(self) -> None:
        for issuer in self.issuers.values():
            issuer.close()
        self.audit.close()
        self.backend.close()
        self.store.close()

    # ------------------------------------------------------------------ keys

    def init(self) -> list[KeyInfo]:
        """One usable key per enabled purpose; running it again changes nothing."""
        with self.store.session() as session:
            missing = [
                purpose
                for purpose in self.settings.enabled_purposes()
                if not queries.keys_by_state(
                    session,
                    purpose.value,
                    [KeyState.ACTIVE.value, KeyState.PENDING.value,
                     KeyState.AWAITING_CERTIFICATE.value],
                )
            ]
        for purpose in missing:
            self.create_key(purpose, actor="init", activate=True)
        return self.keys()

    def create_key(self, purpose: Purpose, *, actor: str, activate: bool) -> KeyInfo:
        """Generate a key in the backend and give it a certificate (or a CSR).

        Sandbox: self-signed at once; the first key of a purpose becomes active,
        later ones pending.  Production: a CSR, and the key awaits its
        certificate (`keyd cert import`).
        """
        life = self.settings.lifecycle[purpose]
        generated = self.backend.generate(
            purpose, life.key_size, exportable=life.exportable and purpose is Purpose.TRANSPORT
        )
        now = self.clock.now()
        subject = x509.Subject(
            organisation=self.settings.keyd.organisation,
            client_id=self.settings.keyd.client_id,
            country=self.settings.keyd.country,
        )
        key = KeyVersion(
            id="kv_" + secrets.token_hex(8),
            purpose=purpose.value,
            state=KeyState.AWAITING_CERTIFICATE.value,
            kid=None,
            backend=self.backend.capabilities.name,
            backend_ref=generated.ref,
            key_size=life.key_size,
            exportable=life.exportable,
            created_at=now,
            state_changed_at=now,
            public_key_pem=_public_pem(generated.public_key),
        )
        cert: cx509.Certificate | None = None
        if self.settings.keyd.mode is Mode.SANDBOX:
            cert = x509.self_signed(
                self.backend, generated.ref, generated.public_key, subject, purpose,
                life.validity, now,
            )
        else:
            csr = x509.make_csr(self.backend, generated.ref, generated.public_key, subject, purpose)
            key.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        with self.store.session() as session:
            session.add(key)
            session.flush()
            if cert is not None:
                self._attach_certificate(session, key, [cert], "self-signed", None, activate)
            self.audit.record(
                AuditEvent(
                    actor=actor,
                    action="key.create",
                    kid=key.kid,
                    purpose=purpose.value,
                    detail={"id": key.id, "state": key.state, "backend": key.backend,
                            "key_size": key.key_size},
                )
            )
            info = _info(key, cert)
        self.invalidate()
        log.info("created %s key %s (%s)", purpose.value, info.kid or info.id, info.state.value)
        return info

    def _attach_certificate(
        self,
        session: Session,
        key: KeyVersion,
        chain: list[cx509.Certificate],
        source: str,
        assigned_kid: str | None,
        activate: bool,
    ) -> None:
        purpose = Purpose(key.purpose)
        leaf = chain[0]
        scheme = self.settings.keyd.kid
        if scheme is KidScheme.ASSIGNED and assigned_kid is None:
            # No directory has assigned one yet (a sandbox self-signed key):
            # the certificate thumbprint serves until an import pins one.
            scheme = KidScheme.X5T_S256
        if assigned_kid is not None:
            scheme = KidScheme.ASSIGNED
        kid = jose.kid_for(scheme, leaf, _load_public(key.public_key_pem), assigned_kid)
        if key.kid is not None and key.kid != kid and KeyState(key.state).published:
            # A published kid is what verifiers cached; it never changes under them.
            raise Conflict(f"key {key.kid} is published; its kid cannot change to {kid}")
        clash = queries.key_by_kid(session, kid)
        if clash is not None and clash.id != key.id:
            raise Conflict(f"kid {kid} already names key {clash.id}")
        for old in queries.certificates_of(session, key.id):
            old.current = False
            session.add(old)
        now = self.clock.now()
        session.add(
            Certificate(
                key_id=key.id,
                chain_pem=x509.chain_pem(chain),
                thumbprint_s256=x509.thumbprint_s256(leaf),
                not_before=utc(leaf.not_valid_before_utc),
                not_after=utc(leaf.not_valid_after_utc),
                source=source,
                created_at=now,
                current=True,
            )
        )
        key.kid = kid
        if KeyState(key.state) is KeyState.AWAITING_CERTIFICATE:
            has_active = bool(
                queries.keys_by_state(session, purpose.value, [KeyState.ACTIVE.value])
            )
            new_state = KeyState.ACTIVE if (activate or not has_active) else KeyState.PENDING
            if new_state is KeyState.ACTIVE and has_active:
                new_state = KeyState.PENDING
            key.state = new_state.value
            key.state_changed_at = now
            key.publish_at = now
            if new_state is KeyState.ACTIVE:
                key.activated_at = now
        session.add(key)

    def keys(self) -> list[KeyInfo]:
        with self.store.session() as session:
            rows = queries.all_keys(session)
            return [_info(k, self._current_leaf(session, k.id)) for k in rows]

    def _current_leaf(self, session: Session, key_id: str) -> cx509.Certificate | None:
        cert = queries.current_certificate(session, key_id)
        return None if cert is None else x509.load_chain(cert.chain_pem.encode())[0]

    def find(self, session: Session, kid_or_id: str) -> KeyVersion:
        key = queries.key_by_kid(session, kid_or_id) or queries.key_by_id(session, kid_or_id)
        if key is None:
            raise NotFound(f"no key with kid or id {kid_or_id!r}")
        return key

    def csr(self, kid_or_id: str, *, actor: str) -> str:
        """The key's CSR (made now, signed by the backend, if it has none yet)."""
        with self.store.session() as session:
            key = self.find(session, kid_or_id)
            state = KeyState(key.state)
            if state in (KeyState.DESTROYED, KeyState.REVOKED):
                raise Conflict(f"key {kid_or_id} is {state.value}; it gets no CSR")
            if key.csr_pem is None:
                subject = x509.Subject(
                    organisation=self.settings.keyd.organisation,
                    client_id=self.settings.keyd.client_id,
                    country=self.settings.keyd.country,
                )
                csr = x509.make_csr(
                    self.backend, key.backend_ref, _load_public(key.public_key_pem), subject,
                    Purpose(key.purpose),
                )
                key.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
                session.add(key)
            self.audit.record(
                AuditEvent(actor=actor, action="key.csr", kid=key.kid, purpose=key.purpose,
                           detail={"id": key.id})
            )
            return key.csr_pem

    def import_certificate(
        self, kid_or_id: str, data: bytes, *, actor: str, assigned_kid: str | None = None
    ) -> tuple[KeyInfo, list[str]]:
        """Attach a CA-issued chain to its key after checking it matches and is sound."""
        if assigned_kid is not None:
            _check_assigned_kid(assigned_kid)
        elif self.settings.keyd.kid is KidScheme.ASSIGNED:
            raise BadRequest("kid scheme is 'assigned': give the directory's kid with --kid")
        chain = x509.load_chain(data)
        with self.store.session() as session:
            key = self.find(session, kid_or_id)
            state = KeyState(key.state)
            if state in (KeyState.DESTROYED, KeyState.REVOKED, KeyState.RETIRED):
                raise Conflict(f"key {kid_or_id} is {state.value}; it takes no certificate")
            warnings = x509.check_chain(
                chain,
                _load_public(key.public_key_pem),
                self.clock.now(),
                production=self.settings.keyd.mode is Mode.PRODUCTION
                and not self.settings.keyd.throwaway,
            )
            if int(key.key_size) < 2048:
                raise CertificateError(f"key {kid_or_id} is under 2048 bits")
            self._attach_certificate(session, key, chain, "imported", assigned_kid, False)
            self.audit.record(
                AuditEvent(
                    actor=actor, action="certificate.import", kid=key.kid, purpose=key.purpose,
                    detail={"id": key.id, "thumbprint": x509.thumbprint_s256(chain[0]),
                            "state": key.state, "warnings": warnings},
                )
            )
            info = _info(key, chain[0])
        self.invalidate()
        return info, warnings

    # ------------------------------------------------------------------ hot path

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = float("-inf")
            self._jwks = None

    def _refresh(self) -> None:
        """Reload the usable keys when the cached view is older than the bound."""
        if time.monotonic() - self._loaded_at < KEY_CACHE_SECONDS:
            return
        with self.store.session() as session:
            rows = queries.published_keys(session)
            usable = {
                k.kid: UsableKey(k.id, k.kid, Purpose(k.purpose), KeyState(k.state), k.backend_ref)
                for k in rows
                if k.kid is not None
            }
        active = {u.purpose: u for u in usable.values() if u.state is KeyState.ACTIVE}
        with self._lock:
            if usable != self._usable:
                self._jwks = None
            self._usable, self._active = usable, active
            self._loaded_at = time.monotonic()

    def active_key(self, purpose: Purpose) -> UsableKey:
        self._refresh()
        key = self._active.get(purpose)
        if key is None:
            raise Conflict(f"no active {purpose.value} key: run `keyd init`")
        return key

    def published_key(self, kid: str) -> UsableKey | None:
        """A published key by kid; the kid is only ever a dictionary key here."""
        self._refresh()
        return self._usable.get(kid)

    def jwks(self) -> tuple[bytes, str]:
        """The public JWKS document and its content-derived ETag."""
        self._refresh()
        with self._lock:
            cached = self._jwks
        if cached is not None:
            return cached
        publish = {Purpose.SIGNING, Purpose.ENCRYPTION}
        if self.settings.keyd.publish_transport:
            publish.add(Purpose.TRANSPORT)
        keys: list[dict[str, object]] = []
        with self.store.session() as session:
            for key in queries.published_keys(session):
                purpose = Purpose(key.purpose)
                cert = queries.current_certificate(session, key.id)
                if purpose not in publish or key.kid is None or cert is None:
                    continue
                chain = x509.load_chain(cert.chain_pem.encode())
                keys.append(
                    jose.public_jwk(
                        _load_public(key.public_key_pem), kid=key.kid, use=purpose.jwk_use,
                        alg=purpose.jwk_alg, chain=chain,
                    )
                )
        body = jose.jwks_document(keys)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        with self._lock:
            self._jwks = (body, etag)
        return body, etag

    # ------------------------------------------------------------------ clients

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
            session.add(
                Client(name=name, policy=policy, token_hash=hash_token(token),
                       created_at=self.clock.now())
            )
            self.audit.record(
                AuditEvent(actor=actor, action="client.add", detail={"client": name,
                                                                     "policy": policy})
            )
        return token

    def authenticate(self, token: str | None) -> Caller:
        """The caller a bearer token belongs to, or 401.

        The lookup is by hash, so no secret-dependent comparison happens on
        the token itself; the hash comparison below is constant-time anyway.
        """
        if not token:
            raise Unauthorized("a bearer token is required")
        digest = hash_token(token)
        cached = self._clients.get(digest)
        if cached is not None and time.monotonic() - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
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

    def admin_caller(self) -> Caller:
        """The CLI acts with the admin policy: it runs as the operator on the host."""
        policy = self.policies.get("admin")
        if policy is None:
            raise KeydError("no 'admin' policy in policies/")
        return Caller("cli", policy)

    # ------------------------------------------------------------------ health

    def ready(self) -> dict[str, object]:
        """Readiness: backend reachable, store reachable, an active key per purpose."""
        checks: dict[str, object] = {}
        try:
            self.backend.check()
            checks["backend"] = "ok"
        except KeydError as e:
            checks["backend"] = e.detail
        try:
            self.store.ping()
            self._loaded_at = float("-inf")
            self._refresh()
            missing = [p.value for p in self.settings.enabled_purposes() if p not in self._active]
            checks["active_keys"] = "ok" if not missing else f"missing: {', '.join(missing)}"
        except KeydError as e:
            checks["store"] = e.detail
        checks.setdefault("store", "ok")
        checks["ready"] = all(v == "ok" for v in checks.values())
        return checks


def _public_pem(public_key: rsa.RSAPublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _load_public(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)  # the store only ever holds RSA keys
    return key


def _check_assigned_kid(kid: str) -> None:
    if not 1 <= len(kid) <= 128 or not all(c.isalnum() or c in "-_.:#" for c in kid):
        raise BadRequest(f"assigned kid {kid[:40]!r} must be 1-128 of [A-Za-z0-9-_.:#]")


def _info(key: KeyVersion, leaf: cx509.Certificate | None) -> KeyInfo:
    purpose = Purpose(key.purpose)
    return KeyInfo(
        id=key.id,
        kid=key.kid,
        purpose=purpose,
        state=KeyState(key.state),
        alg=purpose.jwk_alg,
        key_size=key.key_size,
        backend=key.backend,
        created_at=utc(key.created_at),
        not_before=None if leaf is None else utc(leaf.not_valid_before_utc),
        not_after=None if leaf is None else utc(leaf.not_valid_after_utc),
    )
