"""The lifecycle's state changes, each inside a caller's locked transaction.

Every change of a key's state in keyd goes through ``_move``, which asks
keyd/lifecycle.py whether the transition exists; the callers (transitions,
certificates, key creation) hold the lifecycle lock and write the audit event
in the same transaction, so a change and its record commit together.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from keyd import lifecycle
from keyd.audit import AuditEvent
from keyd.errors import Conflict
from keyd.model import KeyState, Purpose
from keyd.store import queries
from keyd.store.tables import KeyVersion

from .core import ServiceCore
from .values import maybe_utc, rfc3339


class Steps(ServiceCore):
    def _move(self, key: KeyVersion, new: KeyState, now: datetime) -> None:
        """``key`` goes to ``new`` at ``now``; Conflict unless lifecycle allows it."""
        lifecycle.check_transition(key.id, KeyState(key.state), new)
        key.state = new
        key.state_changed_at = now

    def _activate_locked(self, session: Session, key: KeyVersion, *, actor: str,
                         reason: str) -> None:
        """``key`` becomes active; the active key and older pending ones retire."""
        lifecycle.check_transition(key.id, KeyState(key.state), KeyState.ACTIVE)
        if key.kid is None:
            raise Conflict(f"key {key.id} has no certificate yet; import one first")
        now = self.clock.now()
        for old in queries.keys_by_state(session, key.purpose, [KeyState.ACTIVE]):
            self._retire_locked(session, old, now, actor=actor, reason=f"replaced by {key.kid}")
        # Older pending keys were never used: retiring them keeps them published
        # for the overlap (a verifier may have cached them) and then erases them.
        for older in queries.keys_by_state(session, key.purpose, [KeyState.PENDING]):
            if older.id != key.id and older.created_at < key.created_at:
                self._retire_locked(session, older, now, actor=actor,
                                    reason=f"superseded by {key.kid}")
        self._move(key, KeyState.ACTIVE, now)
        key.activated_at = now
        if key.publish_at is None:
            key.publish_at = now
        session.add(key)
        session.flush()
        self.audit.record(AuditEvent(
            actor=actor, action="key.activate", kid=key.kid, purpose=key.purpose,
            detail={"id": key.id, "reason": reason,
                    "published_at": rfc3339(maybe_utc(key.publish_at))},
        ))

    def _retire_locked(self, session: Session, key: KeyVersion, now: datetime, *, actor: str,
                       reason: str) -> None:
        life = self.settings.lifecycle[Purpose(key.purpose)]
        self._move(key, KeyState.RETIRED, now)
        key.retired_at, key.destroy_after = lifecycle.retire_times(now, life)
        session.add(key)
        session.flush()
        self.audit.record(AuditEvent(
            actor=actor, action="key.retire", kid=key.kid, purpose=key.purpose,
            detail={"id": key.id, "reason": reason,
                    "destroy_after": rfc3339(key.destroy_after)},
        ))
