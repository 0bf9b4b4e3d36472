"""The audit log: hash chains in the database, written before results go out.

The log is made of segments, one per replica (process, ``host:pid``; the
events written before segments existed are the segment "legacy"), each its
own hash chain (chain.py).  Appends to one segment are serialised so it
never forks: within a process by one writer thread (writer.py), across
processes by a lock on that segment only, taken inside the appending
transaction (``BEGIN IMMEDIATE`` on SQLite, a per-segment advisory lock on
PostgreSQL) with the primary key (segment, seq) behind both.  A replica
stuck in an append holds only its own segment's lock.

Fail closed: ``AuditLog.record()`` returns only once the event is committed;
otherwise it raises ``StoreUnavailable`` and the caller must not hand out
the result it was about to return.  Details that name secret material are
refused (redaction.py); the SQL lives in keyd/store/audit.py.

    events.py     AuditEvent, AuditRecord, payload_hash
    redaction.py  what names a secret (shared with keyd/logs.py), the detail guard
    writer.py     the writer thread and its group commit
    chain.py      hashing, verify, heads, anchors
    reading.py    listing and paging
    log.py        AuditLog, the handle joining them
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keyd.audit.events import (
    ALL_EVENTS,
    OUTCOMES,
    AuditEvent,
    AuditRecord,
    EventFilter,
    payload_hash,
)
from keyd.audit.redaction import MAX_DETAIL_STRING

if TYPE_CHECKING:
    from keyd.audit.chain import GENESIS, LEGACY, Broken, parse_head
    from keyd.audit.log import AuditLog
    from keyd.audit.writer import MAX_BATCH, WAIT_TIMEOUT

# Loaded on first use: they bring the store (SQLAlchemy) with them, and
# keyd/logs.py imports redaction.py through this package on every CLI start.
_LAZY = {
    "GENESIS": "chain", "LEGACY": "chain", "Broken": "chain", "parse_head": "chain",
    "AuditLog": "log", "MAX_BATCH": "writer", "WAIT_TIMEOUT": "writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyd.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"keyd.audit.{module}"), name)


__all__ = [
    "ALL_EVENTS", "GENESIS", "LEGACY", "MAX_BATCH", "MAX_DETAIL_STRING", "OUTCOMES", "WAIT_TIMEOUT",
    "AuditEvent", "AuditLog", "AuditRecord", "Broken", "EventFilter", "parse_head",
    "payload_hash",
]
