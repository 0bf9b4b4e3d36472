"""Reading the audit log: its head, its verification, filtered listings.

(Writing goes through ``ServiceCore.record`` and the operations themselves.)
"""

from __future__ import annotations

from datetime import datetime

from keyd.audit import AuditRecord, Broken

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

    def audit_events(self, *, since: datetime | None = None, action: str | None = None,
                     kid: str | None = None, actor: str | None = None,
                     limit: int = 100) -> list[AuditRecord]:
        """Events oldest first: the first ``limit`` from ``since``, else the latest."""
        return self.audit.list(since=since, action=action, kid=kid, actor=actor, limit=limit)

    def audit_page(self, *, before: tuple[str, int] | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   action: str | None = None, kid: str | None = None,
                   actor: str | None = None, limit: int = 50) -> list[AuditRecord]:
        """Newest first, filtered, older than the event ``before`` (the console)."""
        return self.audit.page(before=before, since=since, until=until, action=action,
                               kid=kid, actor=actor, limit=limit)
