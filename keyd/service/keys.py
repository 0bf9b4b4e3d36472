"""Key creation: the per-purpose slot claimed first (a key intent), then the key
made in the backend, certified (sandbox) or given a CSR (production), and
stored in the transaction that drops its intent.  Also the key listings."""

from __future__ import annotations

import logging
from dataclasses import replace

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from keyd import failpoints, lifecycle, x509
from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.errors import Conflict, KeydError, RotationUnderWay
from keyd.model import KeyState, Mode, Purpose
from keyd.replica import this_replica
from keyd.store import queries
from keyd.store.tables import Certificate, KeyIntent, KeyVersion, new_key_id

from .certificates import Certificates
from .values import KeyInfo, key_info, key_times, public_pem, rfc3339

log = logging.getLogger("keyd.service")


class Keys(Certificates):
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
                    session, purpose.value,
                    [KeyState.ACTIVE, KeyState.PENDING, KeyState.AWAITING_CERTIFICATE],
                )
            ]
        for purpose in missing:
            try:
                self.create_key(purpose, actor="init")
            except RotationUnderWay as e:
                log.info("init: %s", e.detail)
        return self.keys()

    # ------------------------------------------------------------------ the purpose's slot

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
            key_id = self._new_intent_locked(session, purpose, cap=cap)
            if key_id is None:
                raise RotationUnderWay(f"a {purpose.value} key is being made by another process")
            return key_id

    def _new_intent_locked(self, session: Session, purpose: Purpose, *, cap: bool) -> str | None:
        """Record an intent for a new key of ``purpose`` (its id, the one place key ids
        are made), or None when another process holds the slot."""
        if cap:
            limit = self.settings.lifecycle[purpose].max_published
            count = queries.count_published(session, purpose.value)
            if count + 1 > limit:
                raise Conflict(
                    f"{purpose.value} has {count} published keys and max_published is "
                    f"{limit}: wait until retired keys are destroyed")
        intent = KeyIntent(id=new_key_id(), purpose=purpose, replica=this_replica(),
                           created_at=self.clock.now())
        return intent.id if queries.claim_intent(session, intent) else None

    def _refuse_if_waiting(self, session: Session, purpose: Purpose) -> None:
        waiting = queries.keys_by_state(
            session, purpose.value, [KeyState.PENDING, KeyState.AWAITING_CERTIFICATE])
        if waiting:
            key = waiting[0]
            if KeyState(key.state) is KeyState.PENDING:
                when = lifecycle.ready_at(key_times(key), self.settings.lifecycle[purpose])
                raise RotationUnderWay(
                    f"a {purpose.value} rotation is under way: key {key.kid} is pending "
                    f"and activates at {rfc3339(when)}")
            raise RotationUnderWay(
                f"a {purpose.value} rotation is under way: key {key.id} awaits its "
                f"certificate (`keyd csr {key.id}`, then `keyd cert import`)")
        intent = queries.intent_for(session, purpose.value)
        if intent is not None:
            raise RotationUnderWay(
                f"a {purpose.value} rotation is under way: key {intent.id} is being made "
                f"by {intent.replica} since {rfc3339(utc(intent.created_at))}")

    def _release(self, key_id: str) -> None:
        try:
            with self.store.session("release a key intent", write=True) as session:
                queries.drop_intent(session, key_id)
        except KeydError as e:
            log.warning("key intent %s stays until recovery: %s", key_id, e.detail)

    # ------------------------------------------------------------------ creation

    def create_key(self, purpose: Purpose, *, actor: str, claimed: str | None = None,
                   activate_now: bool = False) -> KeyInfo:
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
            info = self._create_claimed(purpose, key_id, actor=actor, activate_now=activate_now)
        except BaseException:
            self._release(key_id)
            raise
        failpoints.hit("after_create")
        self.invalidate()
        log.info("created %s key %s (%s)", purpose.value, info.kid or info.id, info.state.value)
        return info

    def _create_claimed(self, purpose: Purpose, key_id: str, *, actor: str,
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
                public_key_pem=public_pem(generated.public_key),
            )
            cert: cx509.Certificate | None = None
            if self.settings.keyd.mode is Mode.SANDBOX:
                cert = x509.self_signed(
                    self.backend, generated.ref, generated.public_key, self._subject(), purpose,
                    life.validity, now,
                )
            else:
                csr = x509.make_csr(
                    self.backend, generated.ref, generated.public_key, self._subject(), purpose
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
                    self._attach_certificate(session, key, [cert], "self-signed", None)
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
                info = key_info(key, cert)
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

    # ------------------------------------------------------------------ listings

    def keys(self) -> list[KeyInfo]:
        with self.store.session() as session:
            rows = queries.all_keys(session)
            return [self._dated(key_info(k, self._current_leaf(session, k.id)), k) for k in rows]

    def _dated(self, info: KeyInfo, key: KeyVersion) -> KeyInfo:
        """``info`` with a pending key's activation time (lifecycle.ready_at)."""
        if info.state is not KeyState.PENDING:
            return info
        return replace(info, activates_at=lifecycle.ready_at(
            key_times(key), self.settings.lifecycle[info.purpose]))

    def key_records(self) -> list[tuple[KeyVersion, Certificate | None]]:
        """Every key version with its current certificate, oldest first within each
        purpose (the console's key table; the rows are detached copies)."""
        with self.store.session("console read") as session:
            return [(k, queries.current_certificate(session, k.id))
                    for k in queries.all_keys(session)]

    def rotation_counts(self, keys: list[KeyInfo] | None = None) -> dict[Purpose, int]:
        """Rotations completed per purpose, from the store (so the CLI's, the
        admin API's and every replica's count): each key activated after the first.
        ``keys`` is a fresh ``keys()`` the caller already has."""
        counts = {p: 0 for p in Purpose}
        for key in self.keys() if keys is None else keys:
            if key.activated_at is not None:
                counts[key.purpose] += 1
        return {p: max(n - 1, 0) for p, n in counts.items()}

    def key_times(self, purpose: Purpose) -> list[lifecycle.KeyTimes]:
        """The planner's view of one purpose's key versions."""
        with self.store.session("lifecycle read") as session:
            out = []
            for k in queries.keys_of_purpose(session, purpose.value):
                cert = queries.current_certificate(session, k.id)
                out.append(key_times(k, None if cert is None else cert.not_after))
            return out
