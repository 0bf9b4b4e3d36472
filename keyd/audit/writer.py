"""The writer thread: events appended to this replica's segment by group commit.

The sign path records one event per signature.  Rather than one transaction
(and one fsync) per event, ``Writer.write()`` queues the event and waits; the
thread commits everything queued so far as one batch, then wakes each
waiter, or gives each ``StoreUnavailable``.  Fail closed: ``write()``
returns only once the event is committed (SQLite synchronous=FULL, so on
disk).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from sqlalchemy import Connection

from keyd.audit import chain
from keyd.errors import KeydError, StoreUnavailable
from keyd.replica import this_replica
from keyd.store.db import Store

log = logging.getLogger("keyd.audit")

MAX_BATCH = 2000  # events per group commit
WAIT_TIMEOUT = 30.0  # seconds write() waits for its batch before failing closed


class _Pending:
    """An event on its way into the chain, and the waiter's wake-up call."""

    __slots__ = ("values", "done", "error")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        # A held lock the writer releases: a cheaper wake-up than an Event.
        self.done = threading.Lock()
        self.done.acquire()
        self.error: str | None = None


class Writer:
    """Appends to this replica's segment; one per AuditLog."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None  # the writer thread's own

    def write(self, values: dict[str, Any], action: str) -> None:
        """Append one event's ``values``; durable when this returns, else StoreUnavailable.

        Called inside an open ``store.session()`` on this thread, the event
        joins that transaction instead: it commits, or rolls back, together
        with the change it describes.  (Waiting for the writer there could
        deadlock on SQLite, where the caller's transaction holds the lock.)
        """
        session = self._store.active_session()
        if session is not None:
            with self._store.converted(f"audit append ({action})"):
                chain.append(session.connection(), this_replica(), [values])
            return
        pending = _Pending(values)
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"audit log is closed; {action} not recorded")
            self._start()
            self._queue.put(pending)
        if not pending.done.acquire(timeout=WAIT_TIMEOUT):
            raise StoreUnavailable(f"audit log not written within {WAIT_TIMEOUT:.0f}s ({action})")
        if pending.error is not None:
            raise StoreUnavailable(pending.error)

    def close(self) -> None:
        """Write what is queued, then stop the thread.  Later write() calls fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keyd-audit-writer",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._disconnect()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            # Let threads woken by the last batch queue their next event first.
            time.sleep(0)
            batch = [first]
            # Everything that queued while the last batch was committing goes
            # into this one: one transaction, one fsync for all of them.
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        error: str | None = None
        try:
            # One connection kept for the writer's life: no pool checkout (and
            # no PostgreSQL pre-ping round trip) per batch.
            if self._conn is None:
                self._conn = self._store.connect(write=True)
            # Its turn first (SQLite: another worker may be committing), then
            # BEGIN IMMEDIATE finds the write lock free instead of sleeping.
            with self._store.writer_turn(), self._store.transaction(self._conn, "audit append"):
                chain.append(self._conn, this_replica(), [p.values for p in batch])
        except KeydError as e:
            self._disconnect(broken=True)  # a fresh connection for the next batch
            error = e.detail
        except Exception as e:  # noqa: BLE001 - every waiter must wake, whatever broke
            self._disconnect(broken=True)
            log.exception("audit writer failed")
            error = f"audit log not written: {type(e).__name__}: {e}"
        for p in batch:
            p.error = error
            p.done.release()

    def _disconnect(self, *, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._store.release(conn, broken=broken)
