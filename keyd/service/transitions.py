"""Key transitions an operator or the scheduler asks for: activate, retire,
destroy, rotate (with ``--now``), revoke.

Each is one database transaction holding the lifecycle lock, with its audit
events inside it: the change and its record commit together or not at all.
Each re-reads the key under the lock and checks the transition against
keyd/lifecycle.py (Steps._move), so a step that another process (or an
earlier run, before a crash) already took is refused, not repeated.
"""

from __future__ import annotations

import logging
import time

from keyd import failpoints, lifecycle
from keyd.audit import AuditEvent
from keyd.errors import BadRequest, KeydError, RotationUnderWay
from keyd.model import KeyState, Mode, Purpose
from keyd.store import queries

from .keys import Keys
from .values import KeyInfo, key_info, key_times

log = logging.getLogger("keyd.service")

# How long `rotate --now` waits for a key another process is making.
ROTATE_NOW_WAIT = 60.0


class Transitions(Keys):
    def activate(self, key_id: str, *, actor: str, reason: str) -> KeyInfo:
        """``key_id`` (pending) becomes active; the active key retires, in one transaction."""
        failpoints.hit("before_activate")
        with self.store.session("activate key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            self._activate_locked(session, key, actor=actor, reason=reason)
            info = key_info(key, self._current_leaf(session, key.id))
        failpoints.hit("after_activate")
        self.invalidate()
        log.info("activated %s key %s (%s)", info.purpose.value, info.kid, reason)
        return info

    def retire(self, key_id: str, *, actor: str, reason: str) -> None:
        """Retire a key now (repair of a surplus active key)."""
        with self.store.session("retire key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            self._retire_locked(session, key, self.clock.now(), actor=actor, reason=reason)
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
            if not lifecycle.destroy_due(key_times(key), now):
                return False
            self._move(key, KeyState.DESTROYED, now)
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
        info = self.create_key(purpose, actor=actor, claimed=key_id)
        self._audit_key(actor, "key.rotate", info, {"now": False})
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
                    return key_info(active[0], self._current_leaf(session, active[0].id))
                waiting = queries.keys_by_state(
                    session, purpose.value, [KeyState.PENDING, KeyState.AWAITING_CERTIFICATE])
                if waiting and KeyState(waiting[0].state) is KeyState.PENDING:
                    key = waiting[0]
                    self._activate_locked(session, key, actor=actor,
                                          reason="admin rotation --now")
                    self.audit.record(AuditEvent(
                        actor=actor, action="key.rotate", kid=key.kid, purpose=purpose.value,
                        detail={"id": key.id, "now": True}))
                    info = key_info(key, self._current_leaf(session, key.id))
                    break
                if waiting:  # production: nothing to activate until the CA answers
                    return key_info(waiting[0], None)
                being_made = queries.intent_for(session, purpose.value)
                claimed = (self._new_intent_locked(session, purpose, cap=True)
                           if being_made is None else None)
            if claimed is not None:
                info = self.create_key(purpose, actor=actor, claimed=claimed, activate_now=True)
                failpoints.hit("after_activate")
                self._audit_key(actor, "key.rotate", info, {"now": True})
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
                return key_info(key, None), None
            lifecycle.check_transition(key.id, state, KeyState.REVOKED)
            replacement = next((k.id for k in reversed(queries.keys_by_state(
                session, purpose.value, [KeyState.PENDING])) if k.id != key_id), None)
            awaiting = any(k.id != key_id for k in queries.keys_by_state(
                session, purpose.value, [KeyState.AWAITING_CERTIFICATE]))
        needs_new = (state is KeyState.ACTIVE and replacement is None and not awaiting
                     and purpose in self.settings.enabled_purposes())
        if needs_new and self.settings.keyd.mode is Mode.SANDBOX:
            replacement = self.create_key(purpose, actor=actor).id
        failpoints.hit("before_revoke")
        with self.store.session("revoke key", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, key_id)
            was_active = KeyState(key.state) is KeyState.ACTIVE
            self._move(key, KeyState.REVOKED, self.clock.now())
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
                new_info = key_info(new, self._current_leaf(session, new.id))
            info, ref = key_info(key, None), key.backend_ref
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
                new_info = self.create_key(purpose, actor=actor)
            except RotationUnderWay as e:
                log.info("no new key after revoking %s: %s", key_id, e.detail)
        return info, new_info
