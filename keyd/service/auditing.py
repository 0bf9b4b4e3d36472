"""Reading the audit log: its head, its verification, filtered listings.

(Writing goes through ``ServiceCore.record`` and the operations themselves.)
"""

from __future__ import annotations

from keyd.audit import ALL_EVENTS, AuditRecord, Broken, EventFilter

from .core import ServiceCore


class Auditing(ServiceCore):
    def audit_head(self) -> tuple[int, str]:
        """(events in the chain, digest over every segment's head)."""
        return self.audit.head()

    def audit_verify(self) -> Broken | None:
        """None when every segment's chain is whole, else its first broken event."""
        return self.audit.verify()

    def audit_reaches(self, length: int, digest: str) -> str | None:
        """None when the chain extends the recorded head ``length:digest``, else why not."""
        return self.audit.reaches(length, digest)

    def checkpoint_audit(self) -> str:
        """Log the chain's head, so a copy lives outside the store."""
        return self.audit.checkpoint()

    def audit_events(self, where: EventFilter = ALL_EVENTS, *,
                     limit: int = 100) -> list[AuditRecord]:
        """Events oldest first: the first ``limit`` from ``where.since``, else the latest."""
        return self.audit.list(where, limit=limit)

    def audit_page(self, where: EventFilter = ALL_EVENTS, *,
                   before: tuple[str, int] | None = None, limit: int = 50) -> list[AuditRecord]:
        """Newest first, filtered, older than the event ``before`` (the console)."""
        return self.audit.page(where, before=before, limit=limit)

