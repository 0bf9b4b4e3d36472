"""The initial schema: keys, certificates, clients, audit chain, replay and alert memory.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# What keyd.store.tables.UTCDateTime stores: timestamptz on PostgreSQL,
# UTC wall-clock text on SQLite.
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "key_versions",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("kid", sa.String(), nullable=True),
        sa.Column("backend", sa.String(), nullable=False),
        sa.Column("backend_ref", sa.String(), nullable=False),
        sa.Column("key_size", sa.Integer(), nullable=False),
        sa.Column("exportable", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("state_changed_at", UTC, nullable=False),
        sa.Column("publish_at", UTC, nullable=True),
        sa.Column("activated_at", UTC, nullable=True),
        sa.Column("retired_at", UTC, nullable=True),
        sa.Column("destroy_after", UTC, nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("csr_pem", sa.Text(), nullable=True),
        sa.UniqueConstraint("kid"),
    )
    op.create_index("ix_key_versions_purpose_state", "key_versions", ["purpose", "state"])

    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(), sa.ForeignKey("key_versions.id"), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("thumbprint_s256", sa.String(), nullable=False),
        sa.Column("not_before", UTC, nullable=False),
        sa.Column("not_after", UTC, nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_certificates_key_id", "certificates", ["key_id"])

    op.create_table(
        "clients",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("policy", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("revoked_at", UTC, nullable=True),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_hash"),
    )

    op.create_table(
        "audit_events",
        # seq is set by the chain writer (the hash covers it), never by a sequence.
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
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
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])

    op.create_table(
        "seen_jti",
        sa.Column("issuer", sa.String(), primary_key=True),
        sa.Column("jti", sa.String(), primary_key=True),
        sa.Column("expires_at", UTC, nullable=False),
    )
    op.create_index("ix_seen_jti_expires_at", "seen_jti", ["expires_at"])

    op.create_table(
        "alerts_sent",
        sa.Column("subject", sa.String(), primary_key=True),
        sa.Column("threshold", sa.String(), primary_key=True),
        sa.Column("sent_at", UTC, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "alerts_sent", "seen_jti", "audit_events", "clients", "certificates", "key_versions"
    ):
        op.drop_table(table)
