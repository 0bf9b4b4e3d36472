"""One leader among the processes sharing a store: the lease.

The leader runs the scheduler, recovery, alerts and transport deployment;
every process serves the JWKS and the local API.  Holding the lease takes
two things:

- a lock that the holder's death releases by itself: on PostgreSQL a
  *session* advisory lock on a connection the lease keeps open (a killed
  process's connection closes, the server drops the lock at once); on SQLite
  ``flock`` on a file beside the database (the kernel drops it at exit);
- the ``leases`` row: ``epoch`` goes up by one for every new holder and
  ``expires_at`` (the database's clock) moves forward on every renewal.

A holder that stops renewing (hung, or cut off from PostgreSQL with its
connection still open on the server) keeps the advisory lock but not the
row: once ``expires_at`` has passed, a candidate terminates the holder's
database session and takes over.  The old holder stops calling itself leader
``length`` after its last renewal began (before the row can expire), and
every lifecycle write made for the leader checks the epoch and expiry under
a row lock (``fence``), so a late write from a lost leader is refused.

Every tick also compares this host's clock with the database's: a replica
that drifted more than ``deployment.MAX_CLOCK_SKEW`` hands the lease back (or
does not take it), says so in its log and ``/readyz``, and refuses lifecycle
writes (``clock_error``) until its clock is back.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection
from sqlmodel import Session

from keyd import deployment
from keyd.clock import Clock, SystemClock
from keyd.errors import ClockSkewed, KeydError, LeaseLost
from keyd.replica import this_replica
from keyd.store import lease as sql
from keyd.store.db import Store

log = logging.getLogger("keyd.lease")

LEADER = "leader"
# Share of the lease length the holder trusts its own renewal for (clock rates differ a little).
_TRUST = 0.9


@dataclass(frozen=True)
class LeaseState:
    replica: str
    leader: bool
    epoch: int | None
    expires_at: datetime | None  # the row's expiry when we last held it

    def to_json(self) -> dict[str, object]:
        return {
            "replica": self.replica, "leader": self.leader, "epoch": self.epoch,
            "lease_expires_at": None if self.expires_at is None
            else self.expires_at.isoformat().replace("+00:00", "Z"),
        }


class Lease:
    def __init__(self, store: Store, length: timedelta, *, replica: str | None = None,
                 endpoint: str | None = None, clock: Clock | None = None) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        # Why this replica's clock is refused (too far off the database's), or None.
        self.clock_error: str | None = None
        self.length = length
        self.replica = replica or this_replica()
        self.endpoint = endpoint
        self.on_change: Callable[[bool], None] | None = None
        self._lock = threading.Lock()
        self._conn: Connection | None = None  # PostgreSQL: holds the session advisory lock
        self._fd: int | None = None  # SQLite: holds the flock
        self._epoch: int | None = None
        self._expires_at: datetime | None = None
        self._valid_until = float("-inf")  # time.monotonic() bound of our leadership
        self._started_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    def is_leader(self) -> bool:
        return self._epoch is not None and time.monotonic() < self._valid_until

    @property
    def epoch(self) -> int | None:
        return self._epoch if self.is_leader() else None

    def state(self) -> LeaseState:
        leader = self.is_leader()
        return LeaseState(self.replica, leader, self._epoch if leader else None,
                          self._expires_at if leader else None)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Renew (or try to take) the lease every third of its length, in a thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keyd-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and hand the lease back at once (a clean exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            was = self.is_leader()
            if was:
                try:
                    self._give_back()
                except KeydError as e:
                    log.warning("lease not handed back (it expires by itself): %s", e)
            self._drop()
        if was:
            self._changed(False)

    def _run(self) -> None:
        interval = self.length.total_seconds() / 3
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(interval)

    def tick(self) -> bool:
        """One round: renew when leading, else try to take the lease; then say we
        are alive in ``replicas``.  True when this process leads afterwards.
        A replica whose clock is off the database's gives the lease back."""
        with self._lock:
            was = self.is_leader()
            try:
                if self._epoch is not None and was:
                    self._renew()
                else:
                    self._drop()
                    self._acquire()
            except (OSError, KeydError) as e:
                log.warning("lease %s: %s", "renewal" if was else "attempt", e)
                self._drop()
            leader = self.is_leader()
        if leader != was:
            log.info("replica %s %s (epoch %s)", self.replica,
                     "is the leader" if leader else "is no longer the leader", self._epoch)
            self._changed(leader)
        self._heartbeat(leader)
        return leader

    def _database_now(self, conn: Connection) -> datetime:
        """The database's clock, and this host's clock judged against it: a
        replica more than MAX_CLOCK_SKEW off is refused (``clock_error``)."""
        before = self.clock.now()
        now = self.store.now(conn)
        after = self.clock.now()
        # The database read its clock somewhere in [before, after]: only a
        # distance outside that window is skew (a slow round trip is not).
        skew = max((before - now).total_seconds(), (now - after).total_seconds(), 0.0)
        error = deployment.skew_error(skew)
        if (error is None) != (self.clock_error is None):  # say so once per change
            if error is not None:
                log.error("replica %s: %s; it does not lead and refuses lifecycle writes "
                          "until then", self.replica, error)
            else:
                log.warning("replica %s: clock back within %.0fs of the database's",
                            self.replica, deployment.MAX_CLOCK_SKEW.total_seconds())
        self.clock_error = error
        return now

    def _changed(self, leader: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the lease
                log.exception("lease change listener failed")

    # ------------------------------------------------------------------ fencing

    def fence(self, session: Session) -> None:
        """Refuse (LeaseLost) unless this process still holds the lease, checked
        inside ``session``'s transaction under a share lock on the lease row, so
        a new holder's epoch bump waits for this transaction or refuses it."""
        epoch = self._epoch
        conn = session.connection()
        row = sql.holder(conn, LEADER, share=True)
        now = self.store.now(conn)
        if (epoch is None or row is None or row.epoch != epoch or row.holder != self.replica
                or row.expires_at <= now):
            holder = "nobody" if row is None else f"{row.holder} (epoch {row.epoch})"
            raise LeaseLost(f"replica {self.replica} no longer leads (epoch {epoch}); the "
                            f"lease is held by {holder}")

    # ------------------------------------------------------------------ PostgreSQL / SQLite

    def _acquire(self) -> None:
        if self.store.dialect == "postgresql":
            conn = self._connection()
            if not self._pg_try_lock(conn) and self._pg_take_expired(conn):
                self._pg_try_lock(conn)
            if not self._held:
                return
        else:
            path = self.store.file_path()
            if path is not None:
                fd = os.open(f"{path}.leader", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return
                self._fd = fd
        self._bump()

    _held = False

    def _pg_try_lock(self, conn: Connection) -> bool:
        with self.store.transaction(conn, "lease lock"):
            self._held = sql.try_lock_leader(conn)
        return self._held

    def _pg_take_expired(self, conn: Connection) -> bool:
        """End the session of a holder whose lease row expired; True when one was ended."""
        with self.store.transaction(conn, "lease takeover"):
            row = sql.holder(conn, LEADER)
            if row is None or row.expires_at > self.store.now(conn):
                return False
            pid = sql.leader_lock_pid(conn)
            if pid is None:
                return True  # released meanwhile: try again
            log.warning("lease held by %s expired at %s: ending its database session",
                        row.holder, row.expires_at.isoformat())
            sql.end_session(conn, pid)
        return True

    def _bump(self) -> None:
        """We hold the lock: take the row with the next epoch."""
        started = time.monotonic()
        with self._session() as conn:
            now = self._database_now(conn)
            if self.clock_error is not None:
                raise ClockSkewed(f"not taking the lease: {self.clock_error}")
            row = sql.holder(conn, LEADER, lock=True)
            epoch = 1 if row is None else row.epoch + 1
            sql.take(conn, LEADER, new=row is None, epoch=epoch, replica=self.replica,
                     now=now, expires_at=now + self.length)
        self._epoch, self._expires_at = epoch, now + self.length
        self._valid_until = started + _TRUST * self.length.total_seconds()

    def _renew(self) -> None:
        started = time.monotonic()
        with self._session() as conn:
            now = self._database_now(conn)
            skewed = self.clock_error is not None
            # A skewed clock hands the lease back: another replica takes it at once.
            extended = sql.extend(conn, LEADER, epoch=self._epoch, replica=self.replica,
                                  expires_at=now if skewed else now + self.length)
        if skewed:
            raise ClockSkewed(f"handing the lease back: {self.clock_error}")
        if not extended:
            raise LeaseLost(f"lease epoch {self._epoch} was taken over")
        self._expires_at = now + self.length
        self._valid_until = started + _TRUST * self.length.total_seconds()

    def _give_back(self) -> None:
        with self._session() as conn:
            sql.extend(conn, LEADER, epoch=self._epoch, replica=self.replica,
                       expires_at=self.store.now(conn))

    @contextmanager
    def _session(self) -> Iterator[Connection]:
        """One transaction: on the lease's own connection (PostgreSQL), else a
        write session (SQLite: BEGIN IMMEDIATE)."""
        if self.store.dialect == "postgresql":
            conn = self._connection()
            with self.store.transaction(conn, "lease"):
                yield conn
        else:
            with self.store.session("lease", write=True) as session:
                yield session.connection()

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.store.connect(write=True)
        return self._conn

    def _drop(self) -> None:
        """Forget the lease; closing its connection or file releases the lock."""
        self._epoch, self._expires_at, self._valid_until = None, None, float("-inf")
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            self.store.release(conn, broken=True)  # never back to the pool with the lock held
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # ------------------------------------------------------------------ replicas

    def _heartbeat(self, leader: bool) -> None:
        try:
            with self.store.session("replica heartbeat", write=True) as session:
                conn = session.connection()
                now = self._database_now(conn)
                if self._started_at is None:
                    self._started_at = now
                # Forget replicas gone for a day: `keyd status` shows the recent ones.
                sql.seen(conn, replica=self.replica, started_at=self._started_at, now=now,
                         leader=leader, endpoint=self.endpoint,
                         forget_before=now - timedelta(days=1))
        except KeydError as e:
            log.warning("replica heartbeat not recorded: %s", e.detail)
