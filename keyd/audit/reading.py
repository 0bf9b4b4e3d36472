"""Reading the audit log back: the CLI's listing and the console's pages."""

from __future__ import annotations

import json
from datetime import datetime

from keyd.audit.events import AuditRecord
from keyd.store import audit as sql
from keyd.store.db import Store
from keyd.store.tables import AuditEventRow

MAX_LIST = 10_000
MAX_PAGE = 1000


def latest(
    store: Store,
    *,
    since: datetime | None = None,
    action: str | None = None,
    kid: str | None = None,
    actor: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Events in (time, segment, seq) order: the first `limit` from `since`,
    else the latest `limit`."""
    limit = max(1, min(limit, MAX_LIST))
    with store.session("audit read") as session:
        rows = sql.events(session, since=since, action=action, kid=kid, actor=actor,
                          newest_first=since is None, limit=limit)
    if since is None:
        rows.reverse()
    return [_record(r) for r in rows]


def page(
    store: Store,
    *,
    before: tuple[str, int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    action: str | None = None,
    kid: str | None = None,
    actor: str | None = None,
    limit: int = 50,
) -> list[AuditRecord]:
    """Newest first, filtered (the console): up to `limit` events older, in
    (time, segment, seq) order, than the event `before` (segment, seq)."""
    limit = max(1, min(limit, MAX_PAGE))
    with store.session("audit read") as session:
        rows = sql.events(session, before=before, since=since, until=until, action=action,
                          kid=kid, actor=actor, newest_first=True, limit=limit)
    return [_record(r) for r in rows]


def _record(row: AuditEventRow) -> AuditRecord:
    detail = json.loads(row.detail)
    return AuditRecord(
        segment=row.segment, seq=row.seq, at=row.at, actor=row.actor, action=row.action,
        kid=row.kid, purpose=row.purpose, outcome=row.outcome,
        detail=detail if isinstance(detail, dict) else {"value": detail},
        payload_hash=row.payload_hash, prev_hash=row.prev_hash, hash=row.hash,
    )
