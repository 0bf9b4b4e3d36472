"""Exactly once: at most one active and one waiting key per purpose, and key intents.

Before this revision "one pending key per purpose" was a read-then-write in
the service, and 20 concurrent rotations made 20 pending keys.  Now the
schema says it: partial unique indexes on ``key_versions(purpose)`` for the
``active`` state and for the waiting states (``pending`` and
``awaiting_certificate`` share one slot: a purpose has at most one key on
its way in).  ``key_intents`` records a key before the backend creates it
(one per purpose: the claim a rotation takes first), so recovery can tell a
key being made by a live process from an orphan.

A store that the old code left with surplus keys is repaired first, or the
indexes could not be built: the waiting key published longest stays (it is
the one verifiers have had longest), later pending keys retire (they were
published, so they stay for a 30-day overlap and still decrypt), surplus
keys still awaiting a certificate are revoked (never published); of several
active keys the one activated last stays and the others retire.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

UTC_TYPE = sa.DateTime(timezone=True)
WAITING = "state IN ('pending', 'awaiting_certificate')"
ACTIVE = "state = 'active'"
REPAIR_OVERLAP = timedelta(days=30)


def upgrade() -> None:
    _repair()
    op.create_index(
        "ux_key_versions_one_waiting", "key_versions", ["purpose"], unique=True,
        sqlite_where=sa.text(WAITING), postgresql_where=sa.text(WAITING),
    )
    op.create_index(
        "ux_key_versions_one_active", "key_versions", ["purpose"], unique=True,
        sqlite_where=sa.text(ACTIVE), postgresql_where=sa.text(ACTIVE),
    )
    op.create_table(
        "key_intents",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("backend_ref", sa.String(), nullable=True),
        sa.Column("replica", sa.String(), nullable=False),
        sa.Column("created_at", UTC_TYPE, nullable=False),
        sa.UniqueConstraint("purpose"),
    )


def downgrade() -> None:
    op.drop_table("key_intents")
    op.drop_index("ux_key_versions_one_active", "key_versions")
    op.drop_index("ux_key_versions_one_waiting", "key_versions")


def _repair() -> None:
    from keyd.store.tables import UTCDateTime

    keys = sa.table(
        "key_versions",
        sa.column("id", sa.String()), sa.column("purpose", sa.String()),
        sa.column("state", sa.String()), sa.column("created_at", UTCDateTime()),
        sa.column("publish_at", UTCDateTime()), sa.column("activated_at", UTCDateTime()),
        sa.column("state_changed_at", UTCDateTime()), sa.column("retired_at", UTCDateTime()),
        sa.column("destroy_after", UTCDateTime()), sa.column("revoked_reason", sa.Text()),
    )
    conn = op.get_bind()
    now = datetime.now(UTC)
    rows = conn.execute(sa.select(
        keys.c.id, keys.c.purpose, keys.c.state, keys.c.created_at, keys.c.publish_at,
        keys.c.activated_at,
    ).where(keys.c.state.in_(["pending", "awaiting_certificate", "active"]))).all()
    by_purpose: dict[tuple[str, str], list[sa.Row[tuple[object, ...]]]] = {}
    for row in rows:
        slot = "active" if row.state == "active" else "waiting"
        by_purpose.setdefault((row.purpose, slot), []).append(row)
    for (_, slot), group in by_purpose.items():
        if len(group) < 2:
            continue
        if slot == "active":
            group.sort(key=lambda r: (r.activated_at or r.created_at, r.id))
            surplus = group[:-1]
        else:
            group.sort(key=lambda r: (r.state != "pending", r.publish_at or r.created_at, r.id))
            surplus = group[1:]
        for row in surplus:
            if row.state == "awaiting_certificate":
                values = {"state": "revoked", "state_changed_at": now,
                          "revoked_reason": "surplus rotation (repaired by migration 0002)"}
            else:
                values = {"state": "retired", "state_changed_at": now, "retired_at": now,
                          "destroy_after": now + REPAIR_OVERLAP}
            conn.execute(sa.update(keys).where(keys.c.id == row.id).values(**values))
