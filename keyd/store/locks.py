"""PostgreSQL advisory locks: every key keyd takes, and the one way to take each kind.

The keys are 64-bit: "keyd" and a four-letter tag, so they stay clear of any
other application sharing the server.  They are a contract between versions:
an old and a new process on one database must compute the same numbers to
exclude each other, so a key never changes once released.

SQLite needs none of this: a transaction opened with ``BEGIN IMMEDIATE``
already holds the database's one write lock, and the leader's lock there is
``flock`` on a file (keyd/lease.py).
"""

from __future__ import annotations

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
