"""The lease's SQL: the ``leases`` row, the leader's session lock, ``replicas``.

The rules (who may take the lease, when it is lost) live in keyd/lease.py.
Every function runs inside the caller's transaction on ``conn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, insert, select, update
from sqlmodel import col

from keyd.store import locks
from keyd.store.tables import Lease, ReplicaSeen


@dataclass(frozen=True)
class Holder:
    epoch: int
    holder: str
    expires_at: datetime


def holder(conn: Connection, name: str, *, lock: bool = False,
           share: bool = False) -> Holder | None:
    """Lease ``name``'s row; ``lock``: locked for update until the transaction
    ends, ``share``: share-locked (a new holder's update waits for us)."""
    query = (select(col(Lease.epoch), col(Lease.holder), col(Lease.expires_at))
             .where(col(Lease.name) == name))
    if lock or share:
        query = query.with_for_update(read=share and not lock)
    row = conn.execute(query).first()
    return None if row is None else Holder(int(row.epoch), str(row.holder), row.expires_at)


def take(conn: Connection, name: str, *, new: bool, epoch: int, replica: str,
         now: datetime, expires_at: datetime) -> None:
    """Make ``replica`` the holder of ``name`` at ``epoch``: a ``new`` row, or the
    one ``holder(lock=True)`` locked."""
    values = {"epoch": epoch, "holder": replica, "acquired_at": now, "expires_at": expires_at}
    if new:
        conn.execute(insert(Lease).values(name=name, **values))
    else:
        conn.execute(update(Lease).where(col(Lease.name) == name).values(**values))


def extend(conn: Connection, name: str, *, epoch: int | None, replica: str,
           expires_at: datetime) -> bool:
    """Move the expiry of ``replica``'s lease at ``epoch``; False when it no longer holds it."""
    result = conn.execute(
        update(Lease)
        .where(col(Lease.name) == name, col(Lease.epoch) == epoch,
               col(Lease.holder) == replica)
        .values(expires_at=expires_at))
    return result.rowcount == 1


def try_lock_leader(conn: Connection) -> bool:
    """Take the leader's session lock on ``conn`` if it is free (PostgreSQL)."""
    return locks.try_lock_session(conn, locks.LEADER_LOCK)


def leader_lock_pid(conn: Connection) -> int | None:
    """The database session holding the leader's lock, if any."""
    return locks.session_lock_holder(conn, locks.LEADER_LOCK)


def end_session(conn: Connection, pid: int) -> None:
    locks.end_session(conn, pid)


def seen(conn: Connection, *, replica: str, started_at: datetime, now: datetime,
         leader: bool, endpoint: str | None, forget_before: datetime) -> None:
    """Record that ``replica`` is alive; forget replicas not seen since ``forget_before``."""
    conn.execute(delete(ReplicaSeen).where(col(ReplicaSeen.replica) == replica))
    conn.execute(insert(ReplicaSeen).values(
        replica=replica, started_at=started_at, seen_at=now, leader=leader,
        endpoint=endpoint))
    conn.execute(delete(ReplicaSeen).where(col(ReplicaSeen.seen_at) < forget_before))
