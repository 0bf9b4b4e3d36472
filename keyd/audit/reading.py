"""Reading the audit log back: the CLI's listing and the console's pages."""

from __future__ import annotations

import json

from keyd.audit.events import AuditRecord, EventFilter
from keyd.store import audit as sql
from keyd.store.db import Store
from keyd.store.tables import AuditEventRow

MAX_LIST = 10_000
MAX_PAGE = 1000


def latest(store: Store, where: EventFilter, limit: int) -> list[AuditRecord]:
    """Events in (time, segment, seq) order: the first `limit` from ``where.since``,
    else the latest `limit`."""
    oldest_first = where.since is not None
    with store.session("audit read") as session:
        rows = sql.events(session, where, newest_first=not oldest_first,
                          limit=max(1, min(limit, MAX_LIST)))
    if not oldest_first:
        rows.reverse()
    return [_record(r) for r in rows]


def page(store: Store, where: EventFilter, before: tuple[str, int] | None,
         limit: int) -> list[AuditRecord]:
    """Newest first (the console): up to `limit` events older, in (time,
    segment, seq) order, than the event `before` (segment, seq)."""
    with store.session("audit read") as session:
        rows = sql.events(session, where, before=before, newest_first=True,
                          limit=max(1, min(limit, MAX_PAGE)))
    return [_record(r) for r in rows]


def _record(row: AuditEventRow) -> AuditRecord:
    detail = json.loads(row.detail)
    return AuditRecord(
        segment=row.segment, seq=row.seq, at=row.at, actor=row.actor, action=row.action,
        kid=row.kid, purpose=row.purpose, outcome=row.outcome,
        detail=detail if isinstance(detail, dict) else {"value": detail},
        payload_hash=row.payload_hash, prev_hash=row.prev_hash, hash=row.hash,
    )
