"""The admin console's sessions, stored: a bearer token once at sign-in, then a cookie.

The cookie carries only a random session id (256 bits); the server keeps
the session (the client's name, its CSRF token, its expiries, its flashes)
and stores it under the SHA-256 of that id, so nothing stored can be
replayed as a cookie.  The bearer token itself is never kept: each request
looks the client up by name again, so revoking the client, or taking the
admin policy from it, ends its console sessions at once.

A session ends after ``IDLE`` without a request, after ``ABSOLUTE`` whatever
happens, or at sign-out.

Sessions are shared by every serving process of one host: ``[api] workers``
forks several, and the kernel hands each of the browser's connections to
any of them.  They live in a small SQLite file in the data_dir (mode 0600,
WAL, one short transaction per operation), not in the daemon's store: the
console is served only on the loopback listener, so a browser only ever
talks to the processes of one host, and a session need not outlive or
travel beyond that host (replicas keep their own).  Nothing here needs a
migration: the file is made, or remade, as it is.  (It sits in store/ with
the rest of keyd's SQL; keyd/console/ uses it.)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyd.clock import Clock

IDLE = timedelta(minutes=15)
ABSOLUTE = timedelta(hours=8)
MAX_SESSIONS = 1000  # the oldest session is dropped past this: the file stays bounded
FILE_NAME = "console-sessions.db"
BUSY_TIMEOUT = 5.0  # seconds a process waits for another one's transaction

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    digest     TEXT PRIMARY KEY,
    client     TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL,
    flashes    TEXT NOT NULL DEFAULT '[]'
)
"""


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _us(at: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding in expiry checks)."""
    return (at - _EPOCH) // _US


def _at(us: int) -> datetime:
    return _EPOCH + us * _US


@dataclass
class Session:
    client: str
    csrf: str
    created_at: datetime
    seen_at: datetime
    _store: SessionStore = field(repr=False, compare=False)
    _digest: str = field(repr=False, compare=False)

    def flash(self, message: str) -> None:
        """A message for the next page this session sees (post-redirect-get), whichever
        process serves it."""
        self._store._flash(self._digest, message)

    def take_flashes(self) -> list[str]:
        return self._store._take_flashes(self._digest)


class SessionStore:
    def __init__(self, clock: Clock, path: Path, *, idle: timedelta = IDLE,
                 absolute: timedelta = ABSOLUTE) -> None:
        self._clock = clock
        self.path = Path(path)
        self.idle, self.absolute = idle, absolute
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []
        # Made 0600 before SQLite opens it (its -wal and -shm files take the same mode).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    # One connection per process (a forked worker opens its own, never its parent's),
    # used by one thread at a time; each operation is one short transaction on it.
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None or self._pid != os.getpid():
                if self._db is not None:  # the parent's: kept, never used nor closed here
                    self._inherited.append(self._db)
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
                try:
                    db.execute("PRAGMA synchronous=NORMAL")
                    # At first use, not at start-up: the workers start side by side,
                    # and none should wait for another's lock before it serves.
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    db.execute(_SCHEMA)
                except BaseException:
                    db.close()
                    raise
                self._db, self._pid = db, os.getpid()
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taken at once (no lock upgrade to deadlock on)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def create(self, client: str) -> tuple[str, Session]:
        """A new session for ``client``: (the cookie value, the session)."""
        now = self._clock.now()
        session_id = secrets.token_urlsafe(32)
        key = _digest(session_id)
        session = Session(client=client, csrf=secrets.token_urlsafe(32), created_at=now,
                          seen_at=now, _store=self, _digest=key)
        with self._transaction() as db:
            self._purge(db, now)
            (count,) = db.execute("SELECT count(*) FROM sessions").fetchone()
            if count >= MAX_SESSIONS:
                db.execute("DELETE FROM sessions WHERE digest IN (SELECT digest FROM sessions"
                           " ORDER BY seen_at LIMIT ?)", (count - MAX_SESSIONS + 1,))
            db.execute("INSERT INTO sessions (digest, client, csrf, created_at, seen_at)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (key, client, session.csrf, _us(now), _us(now)))
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value (its idle timer restarted), else None."""
        if not session_id or len(session_id) > 128:
            return None
        now = self._clock.now()
        key = _digest(session_id)
        with self._transaction() as db:
            row = db.execute("SELECT client, csrf, created_at, seen_at FROM sessions"
                             " WHERE digest = ?", (key,)).fetchone()
            if row is None:
                return None
            client, csrf, created_at, seen_at = row
            if self._expired(_at(created_at), _at(seen_at), now):
                db.execute("DELETE FROM sessions WHERE digest = ?", (key,))
                return None
            db.execute("UPDATE sessions SET seen_at = ? WHERE digest = ?", (_us(now), key))
        return Session(client=client, csrf=csrf, created_at=_at(created_at), seen_at=now,
                       _store=self, _digest=key)

    def end(self, session_id: str | None) -> None:
        if session_id:
            with self._transaction() as db:
                db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(session_id),))

    def end_client(self, client: str) -> None:
        """End every session of ``client`` (it was revoked)."""
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE client = ?", (client,))

    def __len__(self) -> int:
        with self._connect() as db:
            (count,) = db.execute("SELECT count(*) FROM sessions").fetchone()
        return int(count)

    def _flash(self, key: str, message: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT flashes FROM sessions WHERE digest = ?",
                             (key,)).fetchone()
            if row is not None:
                db.execute("UPDATE sessions SET flashes = ? WHERE digest = ?",
                           (json.dumps([*json.loads(row[0]), message]), key))

    def _take_flashes(self, key: str) -> list[str]:
        with self._transaction() as db:
            row = db.execute("SELECT flashes FROM sessions WHERE digest = ?",
                             (key,)).fetchone()
            if row is None:
                return []
            taken: list[str] = json.loads(row[0])
            if taken:
                db.execute("UPDATE sessions SET flashes = '[]' WHERE digest = ?", (key,))
        return taken

    def _expired(self, created_at: datetime, seen_at: datetime, now: datetime) -> bool:
        # A clock that went back never extends a session past its absolute end.
        return now - seen_at >= self.idle or now - created_at >= self.absolute

    def _purge(self, db: sqlite3.Connection, now: datetime) -> None:
        db.execute("DELETE FROM sessions WHERE ? - seen_at >= ? OR ? - created_at >= ?",
                   (_us(now), self.idle // _US, _us(now), self.absolute // _US))
