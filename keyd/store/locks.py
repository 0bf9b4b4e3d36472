"""Locks between processes: PostgreSQL advisory locks (every key keyd takes, and
the one way to take each kind), and SQLite's writer turn.

The keys are 64-bit: "keyd" and a four-letter tag, so they stay clear of any
other application sharing the server.  They are a contract between versions:
an old and a new process on one database must compute the same numbers to
exclude each other, so a key never changes once released.

SQLite needs none of this: a transaction opened with ``BEGIN IMMEDIATE``
already holds the database's one write lock, and the leader's lock there is
``flock`` on a file (keyd/lease.py).  What SQLite lacks is a quick queue for
that lock: ``WriterTurn`` gives the audit writers of one host one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, text

MIGRATE_LOCK = 0x6B657964_6D696772  # "keydmigr": one schema upgrade at a time
AUDIT_LOCK = 0x6B657964_61756474  # "keydaudt": hashed with a segment's name, one per segment
LIFECYCLE_LOCK = 0x6B657964_6C696665  # "keydlife": lifecycle transitions
LEADER_LOCK = 0x6B657964_6C656164  # "keydlead": the lease (session-level)


def lock_transaction(conn: Connection, key: int, name: str | None = None) -> None:
    """Hold ``key`` until ``conn``'s transaction ends (PostgreSQL; SQLite: nothing).

    With ``name``, the lock is one of a family under ``key``: one per name
    (``hashtextextended(name, key)``), so holders of different names run at once.
    """
    if conn.dialect.name != "postgresql":
        return
    if name is None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    else:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:s, :k))"),
                     {"s": name, "k": key})


def try_lock_session(conn: Connection, key: int) -> bool:
    """Take ``key`` for the life of ``conn``'s database session, if free (PostgreSQL).

    The server drops it when the session ends, however it ends: a killed
    process's lock goes with its connection.
    """
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one())


def session_lock_holder(conn: Connection, key: int) -> int | None:
    """The backend pid holding session lock ``key`` in this database, if any.

    pg_locks shows a bigint key as (classid, objid) = its high and low halves.
    Advisory locks belong to one database: another keyd on the same server,
    with its own database, holds the same key without excluding us.
    """
    pid = conn.execute(text(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :hi "
        "AND objid = :lo AND objsubid = 1 AND granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"),
        {"hi": key >> 32, "lo": key & 0xFFFFFFFF}).scalar()
    return None if pid is None else int(pid)


def end_session(conn: Connection, pid: int) -> None:
    """Terminate database session ``pid`` (waiting up to 2 s): its locks go with it."""
    conn.execute(text("SELECT pg_terminate_backend(:pid, 2000)"), {"pid": pid})


class WriterTurn:
    """Whose turn it is to write a SQLite file, among this host's keyd processes.

    SQLite has one write lock per file, and a writer that finds it taken
    sleeps in SQLite's busy handler for 1, 2, 5, 10... ms before it looks
    again.  Two workers' audit writers committing in turn would mostly be
    asleep: half the throughput, and p99s of hundreds of ms.  So the audit
    writer first takes this turn: a thread lock within the process, an
    ``flock`` on ``<db>-writer.lock`` across processes, polled every 200 µs.
    Polled rather than blocking: a stopped process holding the file must not
    wedge the others; after ``patience`` seconds the writer goes ahead and
    SQLite's own busy timeout decides.
    """

    POLL = 0.0002

    def __init__(self, database: Path, patience: float = 5.0) -> None:
        self._path = database.with_name(database.name + "-writer.lock")
        self._patience = patience
        self._threads = threading.Lock()
        self._fd: int | None = None

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        with self._threads:
            fd = self._open()
            held = fd is not None and self._acquire(fd)
            try:
                yield
            finally:
                if held and fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int | None:
        """The lock file, made 0600 on first use; None where it cannot be opened
        (a read-only folder): then SQLite's busy handler alone queues the writers."""
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
        return self._fd

    def _acquire(self, fd: int) -> bool:
        deadline = time.monotonic() + self._patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False  # SQLite's busy timeout has the last word
                time.sleep(self.POLL)

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
