"""AuditLog: the one handle the service holds, joining the writer, the chain and reading."""

from __future__ import annotations

import builtins
import logging
from typing import Any

from keyd.audit import chain, reading
from keyd.audit.chain import Broken
from keyd.audit.events import ALL_EVENTS, AuditEvent, AuditRecord, EventFilter, row_values
from keyd.audit.writer import Writer
from keyd.clock import Clock, utc
from keyd.store.db import Store

log = logging.getLogger("keyd.audit")


class AuditLog:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._writer = Writer(store)

    # ------------------------------------------------------------------ writing

    def record(self, event: AuditEvent) -> None:
        """Append `event`; durable when this returns, else StoreUnavailable (and
        the caller must not hand out the result it was about to return).

        Inside an open ``store.session()`` on this thread, the event joins
        that transaction: it commits, or rolls back, with the change it describes.
        """
        self._writer.write(self._prepare(event), event.action)

    def close(self) -> None:
        """Write what is queued, then stop the writer.  Later record() calls fail."""
        self._writer.close()

    def _prepare(self, event: AuditEvent) -> dict[str, Any]:
        return row_values(event, self._clock.now())

    # ------------------------------------------------------------------ the chain

    def verify(self) -> Broken | None:
        """None when every segment's chain is whole, else its first broken event."""
        return chain.verify(self._store)

    def segments(self) -> builtins.list[tuple[str, int, str]]:
        """Every segment's ``(name, length, hash of its newest event)``, sorted."""
        return chain.segments(self._store)

    def head(self) -> tuple[int, str]:
        """``(events, digest)``, recorded in the store; ``(0, GENESIS)`` when empty."""
        return chain.head(self._store, self._clock)

    def checkpoint(self) -> str:
        """Log the head as a checkpoint line (a copy outside the store) and return it."""
        length, digest = self.head()
        line = f"{length}:{digest}"
        log.info("audit checkpoint %s at %s", line, utc(self._clock.now()).isoformat())
        return line

    def reaches(self, length: int, digest: str) -> str | None:
        """None when every segment still reaches head ``length:digest``, else why not."""
        return chain.reaches(self._store, length, digest)

    # ------------------------------------------------------------------ reading

    def list(self, where: EventFilter = ALL_EVENTS, *,
             limit: int = 100) -> builtins.list[AuditRecord]:
        """Events in (time, segment, seq) order: the first `limit` from
        `where.since`, else the latest `limit`."""
        return reading.latest(self._store, where, limit)

    def page(self, where: EventFilter = ALL_EVENTS, *, before: tuple[str, int] | None = None,
             limit: int = 50) -> builtins.list[AuditRecord]:
        """Newest first: up to `limit` events matching `where`, older than
        `before` (segment, seq)."""
        return reading.page(self._store, where, before, limit)
