"""An audit event as callers describe it, and as it is stored."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keyd.audit.redaction import clean_detail
from keyd.clock import utc

OUTCOMES = frozenset({"ok", "refused", "error"})


def payload_hash(data: bytes) -> str:
    """Hex SHA-256 of a payload: proves which bytes an action touched, without them."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class EventFilter:
    """Which events to read: in [since, until), fields equal to those given (None: any)."""

    since: datetime | None = None
    until: datetime | None = None
    action: str | None = None
    kid: str | None = None
    actor: str | None = None


ALL_EVENTS = EventFilter()


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    action: str
    kid: str | None = None
    purpose: str | None = None
    outcome: str = "ok"
    detail: Mapping[str, Any] = field(default_factory=dict)
    payload_hash: str | None = None


def row_values(event: AuditEvent, at: datetime) -> dict[str, Any]:
    """The stored columns of ``event`` (all but its place in a chain); ValueError
    for an unknown outcome or a detail that names secret material."""
    if event.outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {event.outcome!r} is not one of {sorted(OUTCOMES)}")
    detail = clean_detail(event.detail, "detail")
    return {
        "at": utc(at),
        "actor": event.actor,
        "action": event.action,
        "kid": event.kid,
        # The plain value, also when given a Purpose: the chain hashes this text.
        "purpose": None if event.purpose is None else str(event.purpose),
        "outcome": event.outcome,
        "detail": json.dumps(detail, sort_keys=True, separators=(",", ":"), allow_nan=False),
        "payload_hash": event.payload_hash,
    }


@dataclass(frozen=True)
class AuditRecord:
    """One stored event, as read back."""

    segment: str
    seq: int
    at: datetime
    actor: str
    action: str
    kid: str | None
    purpose: str | None
    outcome: str
    detail: dict[str, Any]
    payload_hash: str | None
    prev_hash: str
    hash: str
