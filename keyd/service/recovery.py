"""What crash recovery (keyd/jobs.py ``recover``) needs: the backend's and the
store's view of the keys, and the erasing of what neither needs."""

from __future__ import annotations

from keyd import deployment
from keyd.audit import AuditEvent
from keyd.model import KeyState
from keyd.store import queries
from keyd.store.tables import KeyIntent

from .core import ServiceCore


class Recovery(ServiceCore):
    def claim_backend(self) -> None:
        """The backend's owner mark, if it could not be checked at start-up (an
        outage): before recovery lists the backend's keys as orphans."""
        store_id = self._unclaimed_store
        if store_id is not None:
            deployment.claim_backend(self.backend, store_id, required=True)
            self._unclaimed_store = None

    def held_refs(self) -> set[str]:
        """The refs of every key the backend holds for keyd."""
        return set(self.backend.list_refs())

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
        held = self.held_refs()
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

    def erase_backend_key(self, ref: str, *, actor: str, was: str) -> None:
        """Erase a backend key no stored key needs (``was``: what recovery judged it),
        and record it."""
        self.backend.destroy(ref)
        self.audit.record(AuditEvent(actor=actor, action="key.erase",
                                     detail={"ref": ref, "was": was}))
