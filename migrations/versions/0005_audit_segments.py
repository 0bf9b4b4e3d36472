"""Audit chain segments: one hash chain per replica, verified together.

Every replica (process) appends to its own segment, so a replica stuck in an
append holds only its own segment's lock and the others go on signing.  The
events written before this revision become the segment "legacy", unchanged
(their hashes stay valid).  ``audit_heads`` records every head printed or
checkpointed: hash -> each segment's length and head, so an exported
``LENGTH:HASH`` can be checked against every segment later.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# What keyd.store.tables.UTCDateTime stores (as in 0001).
UTC = sa.DateTime(timezone=True)
_COLUMNS = "seq, at, actor, action, kid, purpose, outcome, detail, payload_hash, prev_hash, hash"


def _events(name: str, *, segmented: bool) -> None:
    key = [sa.Column("segment", sa.String(), nullable=False)] if segmented else []
    op.create_table(
        name,
        *key,
        sa.Column("seq", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("kid", sa.String(), nullable=True),
        sa.Column("purpose", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload_hash", sa.String(), nullable=True),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint(*(["segment"] if segmented else []), "seq"),
    )
    op.create_index("ix_audit_events_at", name, ["at"])


def upgrade() -> None:
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.rename_table("audit_events", "audit_events_0004")
    _events("audit_events", segmented=True)
    op.execute(
        f"INSERT INTO audit_events (segment, {_COLUMNS}) "  # noqa: S608 - fixed names
        f"SELECT 'legacy', {_COLUMNS} FROM audit_events_0004"
    )
    op.drop_table("audit_events_0004")
    op.create_table(
        "audit_heads",
        sa.Column("hash", sa.String(), primary_key=True),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("segments", sa.Text(), nullable=False),  # JSON [[segment, length, head], ...]
        sa.Column("recorded_at", UTC, nullable=False),
    )


def downgrade() -> None:
    # Only a store that never left the legacy chain goes back losslessly.
    op.drop_table("audit_heads")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.rename_table("audit_events", "audit_events_0005")
    _events("audit_events", segmented=False)
    op.execute(
        f"INSERT INTO audit_events ({_COLUMNS}) "  # noqa: S608 - fixed names
        f"SELECT {_COLUMNS} FROM audit_events_0005 WHERE segment = 'legacy'"
    )
    op.drop_table("audit_events_0005")
