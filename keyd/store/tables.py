"""The tables, as SQLModel classes.  Shapes only: the rules live in keyd/service/

`migrations/versions/` creates these tables by hand; tests/backends/test_store.py
checks that the two never drift apart.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import PlainSerializer
from sqlalchemy import DateTime, Dialect, Index, Text, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import AutoString, Field, SQLModel

from keyd.clock import utc
from keyd.model import KeyState, Purpose


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL.

    SQLite has no time zones: SQLAlchemy writes the wall-clock digits and
    drops the offset.  Converting to UTC before writing makes those digits
    mean UTC (and keeps SQLite's string comparison in time order); tagging
    UTC on the way out gives every caller the same aware values PostgreSQL's
    ``timestamptz`` gives.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive datetime has no defined instant; guessing one is how
            # expiries end up hours off.  This is a programming error.
            raise ValueError(f"naive datetime {value.isoformat()} given to the store; use UTC")
        return utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else utc(value)


_E = TypeVar("_E", bound=StrEnum)


class EnumText(TypeDecorator[_E]):
    """A StrEnum stored as its plain value in a text column.

    The schema and the stored values are those of a ``str`` column (no
    database enum type, no migration): ``'signing'``, not ``'SIGNING'``.
    Rows come back as the enum.  Bound values may be the enum or its value;
    anything else is bound as given, so a lookup by an unknown name finds
    nothing (as it did when the column was a plain string) instead of failing.
    """

    impl = AutoString
    cache_ok = True

    def __init__(self, enum: type[_E], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enum = enum

    def process_bind_param(self, value: _E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> _E | None:
        return None if value is None else self.enum(value)


# Dumped (model_dump) as the plain value, whether the field holds the enum
# or, from a caller that built the row by hand, its value.
PurposeValue = Annotated[Purpose, PlainSerializer(str, return_type=str)]
KeyStateValue = Annotated[KeyState, PlainSerializer(str, return_type=str)]


def new_key_id() -> str:
    """A key version's own id: also its provisional name before a kid exists."""
    return "kv_" + secrets.token_hex(8)


# The states that share a purpose's one "next key" slot (migration 0002).
WAITING_STATES_SQL = "state IN ('pending', 'awaiting_certificate')"
ACTIVE_STATE_SQL = "state = 'active'"


class KeyVersion(SQLModel, table=True):
    __tablename__ = "key_versions"
    __table_args__ = (
        Index("ix_key_versions_purpose_state", "purpose", "state"),
        # At most one active and one waiting key per purpose, whatever number
        # of processes rotate at once: the database refuses the second row.
        Index("ux_key_versions_one_waiting", "purpose", unique=True,
              sqlite_where=text(WAITING_STATES_SQL), postgresql_where=text(WAITING_STATES_SQL)),
        Index("ux_key_versions_one_active", "purpose", unique=True,
              sqlite_where=text(ACTIVE_STATE_SQL), postgresql_where=text(ACTIVE_STATE_SQL)),
    )

    id: str = Field(default_factory=new_key_id, primary_key=True)
    purpose: PurposeValue = Field(sa_type=EnumText(Purpose))
    state: KeyStateValue = Field(sa_type=EnumText(KeyState))
    # NULL until a certificate fixes it; NULLs never collide under UNIQUE.
    kid: str | None = Field(default=None, unique=True)
    backend: str  # local | vault | pkcs11
    backend_ref: str
    key_size: int
    exportable: bool = False
    created_at: datetime = Field(sa_type=UTCDateTime)
    state_changed_at: datetime = Field(sa_type=UTCDateTime)
    publish_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    activated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    destroy_after: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_reason: str | None = Field(default=None, sa_type=Text)
    public_key_pem: str = Field(sa_type=Text)
    csr_pem: str | None = Field(default=None, sa_type=Text)


class KeyIntent(SQLModel, table=True):
    """A key about to be made: recorded (claimed) before the backend creates it.

    One per purpose, so the claim is also the rotation lock.  Its row is
    deleted in the transaction that stores the key version; an intent left
    behind by a crash is erased by the leader's recovery after a grace period,
    with the backend key it names.
    """

    __tablename__ = "key_intents"

    id: str = Field(primary_key=True)  # the id the key version will have
    purpose: PurposeValue = Field(sa_type=EnumText(Purpose), unique=True)
    backend_ref: str | None = Field(default=None)  # known once the backend made it
    replica: str  # which process made the claim
    created_at: datetime = Field(sa_type=UTCDateTime)


class Certificate(SQLModel, table=True):
    __tablename__ = "certificates"

    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(foreign_key="key_versions.id", index=True)
    chain_pem: str = Field(sa_type=Text)  # leaf first
    thumbprint_s256: str
    not_before: datetime = Field(sa_type=UTCDateTime)
    not_after: datetime = Field(sa_type=UTCDateTime)
    source: str  # "self-signed" | "imported"
    created_at: datetime = Field(sa_type=UTCDateTime)
    current: bool = True  # the certificate this key presents now


class Client(SQLModel, table=True):
    __tablename__ = "clients"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    policy: str
    # Hex SHA-256 of the bearer token.  Tokens are 256-bit random, so a fast
    # hash is enough (no dictionary to attack) and the token itself is never kept.
    token_hash: str = Field(unique=True)
    created_at: datetime = Field(sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEventRow(SQLModel, table=True):
    """One link of the audit hash chain (see keyd/audit/chain.py for the hash)."""

    __tablename__ = "audit_events"

    # One hash chain per segment (a replica; "legacy" for the events written
    # before segments).  seq is assigned by the segment's writer, not by the
    # database: the row's hash covers it, so it must be known up front.
    segment: str = Field(primary_key=True)
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    actor: str
    action: str
    kid: str | None = Field(default=None)
    purpose: str | None = Field(default=None)
    outcome: str  # ok | refused | error
    detail: str = Field(sa_type=Text)  # canonical JSON; never payloads or secrets
    payload_hash: str | None = Field(default=None)
    prev_hash: str
    hash: str


class AuditHeadRow(SQLModel, table=True):
    """A head once printed or checkpointed: what ``verify --expect`` checks."""

    __tablename__ = "audit_heads"

    hash: str = Field(primary_key=True)
    length: int
    segments: str = Field(sa_type=Text)  # JSON [[segment, length, head], ...], sorted
    recorded_at: datetime = Field(sa_type=UTCDateTime)


class SeenJti(SQLModel, table=True):
    """Replay protection that survives a restart: (issuer, jti) seen before."""

    __tablename__ = "seen_jti"

    issuer: str = Field(primary_key=True)
    jti: str = Field(primary_key=True)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class AlertSent(SQLModel, table=True):
    """One row per expiry alert already sent, so each goes out once."""

    __tablename__ = "alerts_sent"

    subject: str = Field(primary_key=True)
    threshold: str = Field(primary_key=True)
    sent_at: datetime = Field(sa_type=UTCDateTime)



class Lease(SQLModel, table=True):
    """A lease among the processes sharing the store (``leader``: who runs the
    scheduler).  Each new holder raises the epoch; lifecycle writes made for
    the leader check it, so a leader that lost its lease changes nothing."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True)
    epoch: int
    holder: str  # replica name
    acquired_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)  # by the database's clock


class ReplicaSeen(SQLModel, table=True):
    """Each serving process, refreshed every lease tick (`keyd status` lists them)."""

    __tablename__ = "replicas"

    replica: str = Field(primary_key=True)
    started_at: datetime = Field(sa_type=UTCDateTime)
    seen_at: datetime = Field(sa_type=UTCDateTime, index=True)
    leader: bool = False
    endpoint: str | None = Field(default=None)


class DeploymentFact(SQLModel, table=True):
    """Facts fixed when the store was first used: its id, its backend's identity."""

    __tablename__ = "deployment"

    name: str = Field(primary_key=True)
    value: str
