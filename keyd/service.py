"""KeyService: the one place that joins backend, store, policy and audit.

The local API, the CLI and the scheduled jobs all call it; none of them talks
to a backend or the store directly.  Token work (sign, decrypt, verify) lives
in keyd/tokens.py and calls back into this class for keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlmodel import Session

from keyd import deployment, failpoints, jose, lifecycle, x509
from keyd.audit import AuditEvent, AuditLog
from keyd.backends import open_backend
from keyd.backends.base import Backend
from keyd.clock import Clock, SystemClock, utc
from keyd.config import Settings
from keyd.errors import (
    BadRequest,
    CertificateError,
    ClockSkewed,
    Conflict,
    KeydError,
    KeyNotFound,
    NotFound,
    RotationUnderWay,
    StoreUnavailable,
    Unauthorized,
)
from keyd.lease import Lease
from keyd.model import KeyState, KidScheme, Mode, Purpose
from keyd.policy import Policy, load_policies
from keyd.replica import this_replica
from keyd.store import queries
from keyd.store.db import Store
from keyd.store.tables import Certificate, Client, KeyIntent, KeyVersion, new_key_id

if TYPE_CHECKING:
    from keyd.issuers import IssuerKeys

log = logging.getLogger("keyd.service")

# How long the hot path trusts its cached view of the active keys.  Admin calls
# made through this process invalidate it at once; another process's change
# (the CLI) is seen within this bound.
KEY_CACHE_SECONDS = 1.0

# While the store is down, the JWKS is served from its last good copy and the
# store is tried again after this many seconds.
STORE_RETRY = 2.0

# How long `rotate --now` waits for a key another process is making.
ROTATE_NOW_WAIT = 60.0


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
    activated_at: datetime | None = None
    # A pending key's first moment of signing: published + prepublish (the
    # scheduler activates it at its first run from then on).
    activates_at: datetime | None = None

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
            **({"activates_at": _rfc3339(self.activates_at)}
               if self.state is KeyState.PENDING else {}),
        }


@dataclass(frozen=True)
class ClientInfo:
    """A local-API client as admins see it."""

    name: str
    policy: str
    created_at: datetime
    revoked_at: datetime | None


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
        self.issuers: dict[str, IssuerKeys] = {}
        if settings.issuers:  # httpx and jwcrypto are imported only when there is one
            from keyd.issuers import IssuerKeys

            self.issuers = {
                name: IssuerKeys(issuer, clock) for name, issuer in settings.issuers.items()
            }
        self._lock = threading.Lock()
        self._usable: dict[str, UsableKey] = {}  # kid -> key, every published key
        self._active: dict[Purpose, UsableKey] = {}
        self._loaded_at = float("-inf")
        self._jwks: tuple[bytes, str] | None = None
        self._clients: dict[str, tuple[Caller, float]] = {}
        self._fencing = threading.local()
        self._jwks_last_good: tuple[bytes, str] | None = None
        self._store_down_until = float("-inf")
        self.lease: Lease | None = None  # set by `keyd serve`
        # The store's id, until the backend carries its mark (deployment.claim_backend);
        # None once it does, or when nobody asked.
        self._unclaimed_store: str | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, settings: Settings, clock: Clock | None = None, *, require_backend: bool = True
    ) -> KeyService:
        """Store migrated to head, backend checked, policies loaded."""
        store = Store(settings.store.url)
        try:
            store.migrate()
            store_id = deployment.check(store, settings)
            backend = open_backend(settings, require_up=require_backend)
        except BaseException:
            store.close()
            raise
        try:
            claimed = deployment.claim_backend(backend, store_id, required=require_backend)
        except BaseException:
            backend.close()
            store.close()
            raise
        clock = clock or SystemClock()
        service = cls(settings, store, backend, AuditLog(store, clock), clock)
        service._unclaimed_store = None if claimed else store_id
        return service

    def claim_backend(self) -> None:
        """The backend's owner mark, if it could not be checked at start-up (an
        outage): before recovery lists the backend's keys as orphans."""
        store_id = self._unclaimed_store
        if store_id is not None:
            deployment.claim_backend(self.backend, store_id, required=True)
            self._unclaimed_store = None

    def close(self) -> None:
        for issuer in self.issuers.values():
            issuer.close()
        self.audit.close()
        self.backend.close()
        self.store.close()

    # ------------------------------------------------------------------ keys

    def init(self) -> list[KeyInfo]:
        """One usable key per enabled purpose; running it again changes nothing.

        Several processes may run it at once (replicas starting together):
        the per-purpose claim lets one create each key, the others skip it.
        """
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
            try:
                self.create_key(purpose, actor="init", activate=True)
            except RotationUnderWay as e:
                log.info("init: %s", e.detail)
        return self.keys()

    def claim(self, purpose: Purpose, *, cap: bool) -> str:
        """Claim the purpose's one slot for a new key: a key intent, recorded before
        the backend makes anything.  Returns the new key's id.

        Under the lifecycle lock: refused (RotationUnderWay, naming it) while the
        purpose has a pending key, a key awaiting its certificate, or a key
        being made; with ``cap``, refused when one more published key would
        exceed ``max_published``.  The unique indexes behind this make a
        second claim impossible even for code that skips the check.
        """
        with self.store.session("claim a new key", write=True) as session:
            self._lock_lifecycle(session)
            self._refuse_if_waiting(session, purpose)
            if cap:
                limit = self.settings.lifecycle[purpose].max_published
                count = queries.count_published(session, purpose.value)
                if count + 1 > limit:
                    raise Conflict(
                        f"{purpose.value} has {count} published keys and max_published is "
                        f"{limit}: wait until retired keys are destroyed")
            intent = KeyIntent(id=new_key_id(), purpose=purpose, replica=this_replica(),
                               created_at=self.clock.now())
            if not queries.claim_intent(session, intent):
                raise RotationUnderWay(f"a {purpose.value} key is being made by another process")
            return intent.id

    # ------------------------------------------------------------------ fencing

    @contextlib.contextmanager
    def fenced(self, fence: Callable[[Session], None]) -> Iterator[None]:
        """Lifecycle writes on this thread, until the block ends, first call
        ``fence(session)`` in their transaction (the leader's epoch check)."""
        self._fencing.check = fence
        try:
            yield
        finally:
            self._fencing.check = None

    def _lock_lifecycle(self, session: Session) -> None:
        lease = self.lease
        if lease is not None and lease.clock_error is not None:
            raise ClockSkewed(f"replica {lease.replica} makes no lifecycle writes: "
                              f"{lease.clock_error}")
        queries.lock_lifecycle(session)
        check: Callable[[Session], None] | None = getattr(self._fencing, "check", None)
        if check is not None:
            check(session)

    def _refuse_if_waiting(self, session: Session, purpose: Purpose) -> None:
        waiting = queries.keys_by_state(
            session, purpose.value, [KeyState.PENDING, KeyState.AWAITING_CERTIFICATE])
        if waiting:
            key = waiting[0]
            if KeyState(key.state) is KeyState.PENDING:
                when = lifecycle.ready_at(_times(key), self.settings.lifecycle[purpose])
                raise RotationUnderWay(
                    f"a {purpose.value} rotation is under way: key {key.kid} is pending "
                    f"and activates at {_rfc3339(when)}")
            raise RotationUnderWay(
                f"a {purpose.value} rotation is under way: key {key.id} awaits its "
                f"certificate (`keyd csr {key.id}`, then `keyd cert import`)")
        intent = queries.intent_for(session, purpose.value)
        if intent is not None:
            raise RotationUnderWay(
                f"a {purpose.value} rotation is under way: key {intent.id} is being made "
                f"by {intent.replica} since {_rfc3339(utc(intent.created_at))}")

    def _release(self, key_id: str) -> None:
        try:
            with self.store.session("release a key intent", write=True) as session:
                queries.drop_intent(session, key_id)
        except KeydError as e:
            log.warning("key intent %s stays until recovery: %s", key_id, e.detail)

    def create_key(self, purpose: Purpose, *, actor: str, activate: bool,
                   claimed: str | None = None, activate_now: bool = False) -> KeyInfo:
        """Generate a key in the backend and give it a certificate (or a CSR).

        Sandbox: self-signed at once; the first key of a purpose becomes active,
        later ones pending (``activate_now``: active at once, the old one
        retired, in the same transaction).  Production: a CSR, and the key
        awaits its certificate (`keyd cert import`).

        The purpose's slot is claimed first (``claimed``: the caller did);
        the key row replaces the intent in one transaction, which fails when
        recovery has meanwhile erased the intent, so a key recovery gave up
        on never goes live.
        """
        key_id = claimed or self.claim(purpose, cap=False)
        try:
            info = self._create_claimed(purpose, key_id, actor=actor, activate=activate,
                                        activate_now=activate_now)
        except BaseException:
            self._release(key_id)
            raise
        failpoints.hit("after_create")
        self.invalidate()
        log.info("created %s key %s (%s)", purpose.value, info.kid or info.id, info.state.value)
        return info

    def _create_claimed(self, purpose: Purpose, key_id: str, *, actor: str, activate: bool,
                        activate_now: bool) -> KeyInfo:
        life = self.settings.lifecycle[purpose]
        generated = self.backend.generate(
            purpose, life.key_size, exportable=life.exportable and purpose is Purpose.TRANSPORT
        )
        try:
            # Until the commit below the key is known by its intent only; a crash
            # leaves an intent that recovery erases (with this backend key).
            with self.store.session("record a key intent", write=True) as session:
                if not queries.set_intent_ref(session, key_id, generated.ref):
                    raise Conflict(f"key intent {key_id} was erased by recovery; not stored")
            failpoints.hit("after_generate")
            now = self.clock.now()
            subject = x509.Subject(
                organisation=self.settings.keyd.organisation,
                client_id=self.settings.keyd.client_id,
                country=self.settings.keyd.country,
            )
            key = KeyVersion(
                id=key_id,
                purpose=purpose,
                state=KeyState.AWAITING_CERTIFICATE,
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
                csr = x509.make_csr(
                    self.backend, generated.ref, generated.public_key, subject, purpose
                )
                key.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
            failpoints.hit("after_certificate")
            with self.store.session("create key", write=True) as session:
                self._lock_lifecycle(session)
                if not queries.drop_intent(session, key_id):
                    raise Conflict(f"key intent {key_id} was erased by recovery; not stored")
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
                if activate_now and KeyState(key.state) is KeyState.PENDING:
                    self._activate_locked(session, key, actor=actor,
                                          reason="admin rotation --now")
                info = _info(key, cert)
        except BaseException:
            # The key never reached the store (its row was not committed):
            # erase it now rather than leave an orphan for recovery.
            self._discard(generated.ref)
            raise
        return info

    def _discard(self, ref: str) -> None:
        try:
            self.backend.destroy(ref)
        except KeydError as e:
            log.warning("could not erase uncommitted key %s (recover() will): %s", ref, e.detail)

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
            key.state = new_state
            key.state_changed_at = now
            key.publish_at = now
            if new_state is KeyState.ACTIVE:
                key.activated_at = now
        session.add(key)

    def keys(self) -> list[KeyInfo]:
        with self.store.session() as session:
            rows = queries.all_keys(session)
            return [self._dated(_info(k, self._current_leaf(session, k.id)), k) for k in rows]

    def _dated(self, info: KeyInfo, key: KeyVersion) -> KeyInfo:
        """``info`` with a pending key's activation time (lifecycle.ready_at)."""
        if info.state is not KeyState.PENDING:
            return info
        return replace(info, activates_at=lifecycle.ready_at(
            _times(key), self.settings.lifecycle[info.purpose]))

    def rotation_counts(self, keys: list[KeyInfo] | None = None) -> dict[Purpose, int]:
        """Rotations completed per purpose, from the store (so the CLI's, the
        admin API's and every replica's count): each key activated after the first.
        ``keys`` is a fresh ``keys()`` the caller already has."""
        counts = {p: 0 for p in Purpose}
        for key in self.keys() if keys is None else keys:
            if key.activated_at is not None:
                counts[key.purpose] += 1
        return {p: max(n - 1, 0) for p, n in counts.items()}

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
        with self.store.session("certificate import", write=True) as session:
            self._lock_lifecycle(session)
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

    # ------------------------------------------------------------------ lifecycle
    #
    # Each transition below is one database transaction holding the lifecycle
    # lock, with its audit events inside it: the change and its record commit
    # together or not at all.  Each re-reads the key under the lock and checks
    # the transition against keyd/lifecycle.py, so a step that another process
    # (or an earlier run, before a crash) already took is refused, not repeated.

    def key_times(self, purpose: Purpose) -> list[lifecycle.KeyTimes]:
        """The planner's view of one purpose's key versions."""
        with self.store.session("lifecycle read") as session:
            out = []
            for k in queries.keys_of_purpose(session, purpose.value):
                cert = queries.current_certificate(session, k.id)
                out.append(lifecycle.KeyTimes(
                    id=k.id, state=KeyState(k.state), created_at=utc(k.created_at),
                    publish_at=_maybe_utc(k.publish_at), activated_at=_maybe_utc(k.activated_at),
                    retired_at=_maybe_utc(k.retired_at),
                    destroy_after=_maybe_utc(k.destroy_after),
                    not_after=None if cert is None else utc(cert.not_after),
                ))
            return out

    def activate(self, key_id: str, *, actor: str, reason: str) -> KeyInfo:
        """``key_id`` (pending) becomes active; the active key retires, in one transaction."""
        failpoints.hit("before_activate")
        with self.store.session("activate key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            self._activate_locked(session, key, actor=actor, reason=reason)
            info = _info(key, self._current_leaf(session, key.id))
        failpoints.hit("after_activate")
        self.invalidate()
        log.info("activated %s key %s (%s)", info.purpose.value, info.kid, reason)
        return info

    def _activate_locked(self, session: Session, key: KeyVersion, *, actor: str,
                         reason: str) -> None:
        lifecycle.check_transition(key.id, KeyState(key.state), KeyState.ACTIVE)
        if key.kid is None:
            raise Conflict(f"key {key.id} has no certificate yet; import one first")
        now = self.clock.now()
        life = self.settings.lifecycle[Purpose(key.purpose)]
        for old in queries.keys_by_state(session, key.purpose, [KeyState.ACTIVE]):
            self._retire_locked(session, old, now, life.overlap, actor=actor,
                                reason=f"replaced by {key.kid}")
        # Older pending keys were never used: retiring them keeps them published
        # for the overlap (a verifier may have cached them) and then erases them.
        for older in queries.keys_by_state(session, key.purpose, [KeyState.PENDING]):
            if older.id != key.id and older.created_at < key.created_at:
                self._retire_locked(session, older, now, life.overlap, actor=actor,
                                    reason=f"superseded by {key.kid}")
        key.state = KeyState.ACTIVE
        key.state_changed_at = now
        key.activated_at = now
        if key.publish_at is None:
            key.publish_at = now
        session.add(key)
        session.flush()
        self.audit.record(AuditEvent(
            actor=actor, action="key.activate", kid=key.kid, purpose=key.purpose,
            detail={"id": key.id, "reason": reason,
                    "published_at": _rfc3339(_maybe_utc(key.publish_at))},
        ))

    def _retire_locked(self, session: Session, key: KeyVersion, now: datetime,
                       overlap: timedelta, *, actor: str, reason: str) -> None:
        lifecycle.check_transition(key.id, KeyState(key.state), KeyState.RETIRED)
        key.state = KeyState.RETIRED
        key.state_changed_at = now
        key.retired_at = now
        key.destroy_after = now + overlap
        session.add(key)
        session.flush()
        self.audit.record(AuditEvent(
            actor=actor, action="key.retire", kid=key.kid, purpose=key.purpose,
            detail={"id": key.id, "reason": reason,
                    "destroy_after": _rfc3339(key.destroy_after)},
        ))

    def retire(self, key_id: str, *, actor: str, reason: str) -> None:
        """Retire a key now (repair of a surplus active key)."""
        with self.store.session("retire key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            life = self.settings.lifecycle[Purpose(key.purpose)]
            self._retire_locked(session, key, self.clock.now(), life.overlap, actor=actor,
                                reason=reason)
        self.invalidate()

    def destroy(self, key_id: str, *, actor: str) -> bool:
        """Destroy a retired key whose overlap is over; False when not (or no longer) due.

        The store says ``destroyed`` first (the key leaves the JWKS), then the
        backend erases it.  A crash in between leaves a backend key of a
        destroyed row, which recover() erases: never a published kid whose
        private key is gone.
        """
        failpoints.hit("before_destroy")
        with self.store.session("destroy key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            now = self.clock.now()
            due = (KeyState(key.state) is KeyState.RETIRED and key.destroy_after is not None
                   and utc(key.destroy_after) <= now)
            if not due:
                return False
            key.state = KeyState.DESTROYED
            key.state_changed_at = now
            session.add(key)
            self.audit.record(AuditEvent(
                actor=actor, action="key.destroy", kid=key.kid, purpose=key.purpose,
                detail={"id": key.id, "backend": key.backend},
            ))
            ref = key.backend_ref
        self.invalidate()
        failpoints.hit("before_backend_destroy")
        self.backend.destroy(ref)
        failpoints.hit("after_backend_destroy")
        log.info("destroyed key %s", key_id)
        return True

    def rotate(self, purpose: Purpose, *, actor: str, now: bool = False) -> KeyInfo:
        """Start a rotation: a new key, pending for ``prepublish`` (sandbox) or
        awaiting its certificate (production).  While one is under way a second
        is refused (RotationUnderWay, 409) naming the key and when it activates.

        ``now=True`` activates a key at once, skipping pre-publication: verifiers
        holding a cached JWKS (PayNet: up to 15 minutes) reject tokens signed
        by the new key until they refetch.  For emergencies only.
        """
        if purpose not in self.settings.enabled_purposes():
            raise BadRequest(f"purpose {purpose.value} is not enabled")
        if now:
            return self._rotate_now(purpose, actor=actor)
        key_id = self.claim(purpose, cap=True)
        info = self.create_key(purpose, actor=actor, activate=False, claimed=key_id)
        self._audit_simple(actor, "key.rotate", info, {"now": False})
        with self.store.session("lifecycle read") as session:
            row = queries.key_by_id(session, info.id)
        return info if row is None else self._dated(info, row)

    def _rotate_now(self, purpose: Purpose, *, actor: str) -> KeyInfo:
        """Serialised forced rotations: the key active when the call arrived stops
        signing when it returns, and concurrent calls share one new key.

        Under the lifecycle lock, in order: another forced rotation already
        replaced the key we found -> that is the answer; a pending key ->
        activated in this transaction; a key being made elsewhere -> wait for
        it; else claim the slot and make a key that is activated in the
        transaction that stores it.
        """
        with self.store.session("lifecycle read") as session:
            found = [k.id for k in queries.keys_by_state(session, purpose.value,
                                                         [KeyState.ACTIVE])]
        deadline = time.monotonic() + ROTATE_NOW_WAIT
        while True:
            with self.store.session("rotate now", write=True) as session:
                self._lock_lifecycle(session)
                active = queries.keys_by_state(session, purpose.value, [KeyState.ACTIVE])
                if active and active[0].id not in found:
                    return _info(active[0], self._current_leaf(session, active[0].id))
                waiting = queries.keys_by_state(
                    session, purpose.value, [KeyState.PENDING, KeyState.AWAITING_CERTIFICATE])
                if waiting and KeyState(waiting[0].state) is KeyState.PENDING:
                    key = waiting[0]
                    self._activate_locked(session, key, actor=actor,
                                          reason="admin rotation --now")
                    self.audit.record(AuditEvent(
                        actor=actor, action="key.rotate", kid=key.kid, purpose=purpose.value,
                        detail={"id": key.id, "now": True}))
                    info = _info(key, self._current_leaf(session, key.id))
                    break
                if waiting:  # production: nothing to activate until the CA answers
                    return _info(waiting[0], None)
                being_made = queries.intent_for(session, purpose.value)
                claimed: str | None = None
                if being_made is None:
                    limit = self.settings.lifecycle[purpose].max_published
                    count = queries.count_published(session, purpose.value)
                    if count + 1 > limit:
                        raise Conflict(
                            f"{purpose.value} has {count} published keys and max_published "
                            f"is {limit}: wait until retired keys are destroyed")
                    claimed = new_key_id()
                    queries.claim_intent(session, KeyIntent(
                        id=claimed, purpose=purpose, replica=this_replica(),
                        created_at=self.clock.now()))
            if claimed is not None:
                info = self.create_key(purpose, actor=actor, activate=False, claimed=claimed,
                                       activate_now=True)
                failpoints.hit("after_activate")
                self._audit_simple(actor, "key.rotate", info, {"now": True})
                return info
            if time.monotonic() > deadline:
                maker = being_made.replica if being_made is not None else "another process"
                raise RotationUnderWay(
                    f"a {purpose.value} key is still being made by {maker}; try again")
            time.sleep(0.05)  # another process is making the key this call will activate
        failpoints.hit("after_activate")
        self.invalidate()
        log.info("activated %s key %s (admin rotation --now)", purpose.value, info.kid)
        return info

    def revoke(self, kid_or_id: str, *, reason: str, actor: str) -> tuple[KeyInfo, KeyInfo | None]:
        """Revoke a key: out of the JWKS at once, refused for every operation.

        Revoking the active key activates a replacement in the same
        transaction: a pending key if there is one, else (sandbox) a new one.
        In production with no pending key there is no certificate to activate:
        the purpose is left with no active key (signing fails closed with 409),
        a new key and CSR are made, and the reconciler alerts until the CA's
        certificate is imported, which activates it at once.
        """
        reason = reason.strip()
        if not reason or len(reason) > 256:
            raise BadRequest("a revocation needs a reason of 1-256 characters")
        with self.store.session("lifecycle read") as session:
            key = self.find(session, kid_or_id)
            state, purpose, key_id = KeyState(key.state), Purpose(key.purpose), key.id
            if state is KeyState.REVOKED:
                return _info(key, None), None
            lifecycle.check_transition(key.id, state, KeyState.REVOKED)
            replacement = next((k.id for k in reversed(queries.keys_by_state(
                session, purpose.value, [KeyState.PENDING])) if k.id != key_id), None)
            awaiting = any(k.id != key_id for k in queries.keys_by_state(
                session, purpose.value, [KeyState.AWAITING_CERTIFICATE]))
        needs_new = (state is KeyState.ACTIVE and replacement is None and not awaiting
                     and purpose in self.settings.enabled_purposes())
        if needs_new and self.settings.keyd.mode is Mode.SANDBOX:
            replacement = self.create_key(purpose, actor=actor, activate=False).id
        failpoints.hit("before_revoke")
        with self.store.session("revoke key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            lifecycle.check_transition(key.id, KeyState(key.state), KeyState.REVOKED)
            was_active = KeyState(key.state) is KeyState.ACTIVE
            now = self.clock.now()
            key.state = KeyState.REVOKED
            key.state_changed_at = now
            key.revoked_reason = reason
            session.add(key)
            session.flush()
            self.audit.record(AuditEvent(
                actor=actor, action="key.revoke", kid=key.kid, purpose=key.purpose,
                detail={"id": key.id, "reason": reason, "was": state.value},
            ))
            new_info: KeyInfo | None = None
            if was_active and replacement is not None:
                new = self.find(session, replacement)
                self._activate_locked(session, new, actor=actor, reason=f"{key_id} revoked")
                new_info = _info(new, self._current_leaf(session, new.id))
            info, ref = _info(key, None), key.backend_ref
        failpoints.hit("after_revoke")
        self.invalidate()
        log.warning("revoked %s key %s: %s", purpose.value, info.kid or info.id, reason)
        try:
            self.backend.destroy(ref)  # a revoked key is never used again
        except KeydError as e:
            log.warning("revoked key %s stays in the backend until recovery: %s", key_id,
                        e.detail)
        if needs_new and self.settings.keyd.mode is Mode.PRODUCTION:
            try:
                new_info = self.create_key(purpose, actor=actor, activate=False)
            except RotationUnderWay as e:
                log.info("no new key after revoking %s: %s", key_id, e.detail)
        return info, new_info

    def backend_refs(self) -> tuple[set[str], dict[str, tuple[str, KeyState]]]:
        """(refs the backend holds, ref -> (key id, state) for every stored key)."""
        held, known, _ = self.recovery_view()
        return held, known

    def recovery_view(
        self,
    ) -> tuple[set[str], dict[str, tuple[str, KeyState]], list[KeyIntent]]:
        """(refs the backend holds, ref -> (key id, state), key intents).

        Listed in this order on purpose: a ref the backend listed was generated
        after its intent was claimed, and the intent is deleted in the
        transaction that stores the key; reading intents before keys, each
        such ref is seen under one or the other (never neither).
        """
        self.claim_backend()  # never erase keys that belong to another store
        held = set(self.backend.list_refs())
        with self.store.session("lifecycle read") as session:
            intents = queries.all_intents(session)
            known = {k.backend_ref: (k.id, KeyState(k.state)) for k in queries.all_keys(session)
                     if k.backend == self.backend.capabilities.name}
        return held, known, intents

    def abandon_intent(self, intent: KeyIntent, *, actor: str) -> bool:
        """Erase an intent recovery judged dead, then the backend key it names.

        The row goes first: the process that made it (if it still runs) then
        fails to store its key and discards it, so nothing live is erased.
        False when the intent was gone already (its key was stored meanwhile).
        """
        with self.store.session("erase a key intent", write=True) as session:
            self._lock_lifecycle(session)
            if not queries.drop_intent(session, intent.id):
                return False
            self.audit.record(AuditEvent(
                actor=actor, action="key.intent.erase", purpose=intent.purpose,
                detail={"id": intent.id, "replica": intent.replica,
                        "ref": intent.backend_ref}))
        if intent.backend_ref is not None:
            self.backend.destroy(intent.backend_ref)
        return True

    def _audit_simple(self, actor: str, action: str, info: KeyInfo,
                      detail: dict[str, object]) -> None:
        self.audit.record(AuditEvent(actor=actor, action=action, kid=info.kid,
                                     purpose=info.purpose.value,
                                     detail={"id": info.id, **detail}))

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
        """The public JWKS document and its content-derived ETag.

        While the store is down the last good copy is served (SPEC: the JWKS
        stays up), and the store is asked again only every STORE_RETRY
        seconds, so an outage does not make every fetch wait out a timeout.
        """
        last = self._jwks_last_good
        if last is not None and time.monotonic() < self._store_down_until:
            return last
        try:
            document = self._current_jwks()
        except StoreUnavailable as e:
            if last is None:
                raise
            self._store_down_until = time.monotonic() + STORE_RETRY
            log.warning("serving the last good JWKS: %s", e.detail)
            return last
        self._jwks_last_good = document
        return document

    def _current_jwks(self) -> tuple[bytes, str]:
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
            # The active key first: an encrypter that takes the first `enc` key
            # of the set then picks the active one, not a retired one on its
            # way to destruction.
            rank = {KeyState.ACTIVE.value: 0, KeyState.PENDING.value: 1}
            for key in sorted(queries.published_keys(session), key=lambda k: rank.get(k.state, 2)):
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

    def clients(self) -> list[ClientInfo]:
        """Every client, revoked ones too (never a token or its hash)."""
        with self.store.session() as session:
            return [ClientInfo(c.name, c.policy, utc(c.created_at), _maybe_utc(c.revoked_at))
                    for c in queries.all_clients(session)]

    def revoke_client(self, name: str, *, actor: str) -> None:
        """Revoke a client: its token is refused from now on (401)."""
        if not 1 <= len(name) <= 64 or "\x00" in name:  # no client has such a name
            raise NotFound(f"no client {name[:64]!r}")
        with self.store.session("revoke client", write=True) as session:
            client = queries.client_by_name(session, name)
            if client is None:
                raise NotFound(f"no client {name[:64]!r}")
            if client.revoked_at is not None:
                raise Conflict(f"client {name!r} was revoked at {_rfc3339(client.revoked_at)}")
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

    # ------------------------------------------------------------------ health

    def ready(self) -> dict[str, object]:
        """Readiness: backend reachable, store writable, an active key per purpose
        and each of them present in the backend; and who this replica is."""
        checks: dict[str, str] = {}
        try:
            self.backend.check()
            checks["backend"] = "ok"
        except KeydError as e:
            checks["backend"] = e.detail
        try:
            self.store.ping(write=True)
            checks["store"] = "ok"
        except KeydError as e:
            checks["store"] = e.detail
        try:
            self._loaded_at = float("-inf")
            self._refresh()
            missing = [p.value for p in self.settings.enabled_purposes() if p not in self._active]
            checks["active_keys"] = "ok" if not missing else f"missing: {', '.join(missing)}"
        except KeydError as e:
            checks["active_keys"] = e.detail
        if checks["backend"] == "ok":
            checks["active_keys_in_backend"] = self._active_keys_in_backend()
        if self.lease is not None:
            checks["clock"] = self.lease.clock_error or "ok"
        lease = self.lease.state() if self.lease is not None else None
        return {
            "ready": all(v == "ok" for v in checks.values()),
            "replica": lease.replica if lease is not None else this_replica(),
            "leader": lease.leader if lease is not None else False,
            "lease_expires_at": None if lease is None else lease.to_json()["lease_expires_at"],
            "epoch": None if lease is None else lease.epoch,
            "checks": checks,
        }

    def _active_keys_in_backend(self) -> str:
        """A key deleted from the backend behind keyd's back makes this replica
        not ready at once (the leader's recovery alerts and replaces it)."""
        lost = []
        for key in list(self._active.values()):
            try:
                self.backend.public_key(key.ref)
            except KeyNotFound:
                lost.append(f"{key.purpose.value} key {key.kid}")
            except KeydError as e:
                return e.detail
        return "ok" if not lost else f"missing from the backend: {', '.join(lost)}"

    def replicas(self, within: timedelta) -> list[dict[str, object]]:
        """The serving processes seen within ``within`` (newest first)."""
        with self.store.session("replicas read") as session:
            rows = queries.replicas_seen(session)
            now = self.store.now(session.connection())
        return [{"replica": r.replica, "leader": r.leader, "endpoint": r.endpoint,
                 "started_at": _rfc3339(utc(r.started_at)),
                 "seen_seconds_ago": round((now - utc(r.seen_at)).total_seconds(), 1)}
                for r in rows if now - utc(r.seen_at) <= within]


def _times(key: KeyVersion) -> lifecycle.KeyTimes:
    return lifecycle.KeyTimes(
        id=key.id, state=KeyState(key.state), created_at=utc(key.created_at),
        publish_at=_maybe_utc(key.publish_at), activated_at=_maybe_utc(key.activated_at),
        retired_at=_maybe_utc(key.retired_at), destroy_after=_maybe_utc(key.destroy_after))


def _maybe_utc(when: datetime | None) -> datetime | None:
    return None if when is None else utc(when)


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
        activated_at=None if key.activated_at is None else utc(key.activated_at),
    )
