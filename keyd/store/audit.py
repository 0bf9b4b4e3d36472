"""The audit log's SQL: appending to a segment, reading chains back, heads.

The chain's rules (what is hashed, what "broken" means) live in
keyd/audit/chain.py; this module only moves rows.  Callers convert
SQLAlchemy errors through the Store (its sessions, ``transaction``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, literal, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from keyd.audit.events import EventFilter
from keyd.store.locks import AUDIT_LOCK, lock_transaction
from keyd.store.tables import AuditEventRow, AuditHeadRow

# Events in this order: by time, ties broken by (segment, seq).
_ORDER = (col(AuditEventRow.at), col(AuditEventRow.segment), col(AuditEventRow.seq))


def lock_segment(conn: Connection, segment: str) -> None:
    """Be the one appender to ``segment``, in every process, until the transaction ends.

    Other segments append meanwhile.  (SQLite: the transaction began with
    BEGIN IMMEDIATE, or already holds the write lock through the caller's writes.)
    """
    lock_transaction(conn, AUDIT_LOCK, segment)


def last_link(conn: Connection, segment: str) -> tuple[int, str] | None:
    """``(seq, hash)`` of ``segment``'s newest event; None when it has none."""
    last = conn.execute(
        select(col(AuditEventRow.seq), col(AuditEventRow.hash))
        .where(AuditEventRow.segment == segment)
        .order_by(col(AuditEventRow.seq).desc())
        .limit(1)
    ).first()
    return None if last is None else (int(last[0]), str(last[1]))


def insert_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(AuditEventRow), rows)


def segment_names(session: Session) -> list[str]:
    return [str(s) for s in session.exec(
        select(col(AuditEventRow.segment)).distinct().order_by(col(AuditEventRow.segment))
    ).all()]


def segment_rows(session: Session, segment: str, after: int, limit: int) -> list[AuditEventRow]:
    """Up to ``limit`` events of ``segment`` with seq above ``after``, in seq order."""
    return list(session.exec(
        select(AuditEventRow)
        .where(AuditEventRow.segment == segment)
        .where(col(AuditEventRow.seq) > after)
        .order_by(col(AuditEventRow.seq))
        .limit(limit)
    ).all())


def segment_heads(session: Session) -> list[tuple[str, int, str]]:
    """Every segment's ``(name, length, hash of its newest event)``, sorted."""
    seg, seq = col(AuditEventRow.segment), col(AuditEventRow.seq)
    last = (select(seg.label("segment"), func.max(seq).label("seq"))
            .group_by(seg).subquery())
    rows = session.exec(
        select(seg, seq, col(AuditEventRow.hash))
        .join(last, (last.c.segment == seg) & (last.c.seq == seq))
        .order_by(seg)
    ).all()
    return [(str(r[0]), int(r[1]), str(r[2])) for r in rows]


def record_head(conn: Connection, values: dict[str, Any]) -> None:
    """Remember a head (insert unless that digest is already there)."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(dialect_insert(AuditHeadRow).values(**values).on_conflict_do_nothing())


def recorded_head(session: Session, digest: str) -> AuditHeadRow | None:
    return session.get(AuditHeadRow, digest)


def event_hash(session: Session, segment: str, seq: int) -> str | None:
    row = session.get(AuditEventRow, (segment, seq))
    return None if row is None else row.hash


def _filtered(query: SelectOfScalar[AuditEventRow],
              where: EventFilter) -> SelectOfScalar[AuditEventRow]:
    if where.since is not None:
        query = query.where(col(AuditEventRow.at) >= where.since)
    if where.until is not None:
        query = query.where(col(AuditEventRow.at) < where.until)
    for column, value in ((AuditEventRow.action, where.action), (AuditEventRow.kid, where.kid),
                          (AuditEventRow.actor, where.actor)):
        if value is not None:
            query = query.where(column == value)
    return query


def events(session: Session, where: EventFilter, *, before: tuple[str, int] | None = None,
           newest_first: bool, limit: int) -> list[AuditEventRow]:
    """Events matching ``where``, older than the event ``before`` (segment, seq)
    when given, in (time, segment, seq) order or its reverse."""
    query = _filtered(select(AuditEventRow), where)
    if before is not None:
        at = (select(col(AuditEventRow.at))
              .where(AuditEventRow.segment == before[0], AuditEventRow.seq == before[1])
              .scalar_subquery())
        query = query.where(tuple_(*_ORDER) < tuple_(at, literal(before[0]),
                                                     literal(before[1])))
    order = [c.desc() for c in _ORDER] if newest_first else list(_ORDER)
    return list(session.exec(query.order_by(*order).limit(limit)).all())


def last_seen(session: Session, actors: list[str], window: int) -> dict[str, datetime]:
    """When each of ``actors`` last acted, among the newest ``window`` events
    (any segment): a bounded read on a busy log."""
    recent = (select(col(AuditEventRow.actor).label("actor"),
                     col(AuditEventRow.at).label("at"))
              .order_by(col(AuditEventRow.at).desc())
              .limit(window).subquery())
    rows = session.exec(
        select(recent.c.actor, func.max(recent.c.at))
        .where(recent.c.actor.in_(actors))
        .group_by(recent.c.actor)
    ).all()
    return {str(actor): at for actor, at in rows}
