"""The advisory locks: one helper, and the same keys as every earlier keyd
version, so old and new processes on one database exclude each other."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from keyd.store import locks, queries
from keyd.store.db import Store
from tests.fixtures.postgres import PG_ADMIN_DSN, PG_URL


def _key(tag: bytes) -> int:
    return int.from_bytes(b"keyd" + tag, "big")


def test_every_lock_key_is_keyd_and_its_tag_as_it_always_was() -> None:
    assert (locks.MIGRATE_LOCK, locks.AUDIT_LOCK, locks.LIFECYCLE_LOCK, locks.LEADER_LOCK) == (
        _key(b"migr"), _key(b"audt"), _key(b"life"), _key(b"lead"))
    # The literal numbers earlier releases compiled in.
    assert locks.LIFECYCLE_LOCK == 0x6B657964_6C696665
    assert locks.MIGRATE_LOCK == 0x6B657964_6D696772


@pytest.fixture
def pg(postgres_url: str) -> Iterator[tuple[Store, psycopg.Connection[tuple[object, ...]]]]:
    """The store, and a plain second connection standing in for an older keyd."""
    store = Store(postgres_url)
    store.migrate()
    other = psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://"),
                            autocommit=True)
    try:
        yield store, other
    finally:
        other.close()
        store.close()


def _free(other: psycopg.Connection[tuple[object, ...]], sql: str, *args: object) -> bool:
    """Could the other session take the lock right now?  (Released at once.)"""
    with other.transaction():
        row = other.execute(sql, args).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.mark.postgres
def test_the_lifecycle_lock_excludes_a_process_using_the_old_literal_key(
        pg: tuple[Store, psycopg.Connection[tuple[object, ...]]]) -> None:
    store, other = pg
    old_sql = f"SELECT pg_try_advisory_xact_lock({0x6B657964_6C696665})"
    with store.session(write=True) as session:
        queries.lock_lifecycle(session)
        assert not _free(other, old_sql)
    assert _free(other, old_sql)  # the transaction ended: released


@pytest.mark.postgres
def test_a_segment_lock_excludes_that_segment_only(
        pg: tuple[Store, psycopg.Connection[tuple[object, ...]]]) -> None:
    store, other = pg
    sql = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, %s))"
    with store.session(write=True) as session:
        locks.lock_transaction(session.connection(), locks.AUDIT_LOCK, "host-a:1")
        assert not _free(other, sql, "host-a:1", locks.AUDIT_LOCK)
        assert _free(other, sql, "host-b:2", locks.AUDIT_LOCK)


@pytest.mark.postgres
def test_the_leader_lock_holder_is_found_in_this_database_only(
        pg: tuple[Store, psycopg.Connection[tuple[object, ...]]]) -> None:
    """Another database on the same server (another deployment, or a parallel
    test) may hold the same key: only this database's holder is named."""
    store, other = pg
    name = "keyd_test_neighbour_" + secrets.token_hex(4)
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    neighbour = Store(PG_URL.format(db=name))
    conn, elsewhere = store.connect(), neighbour.connect()
    try:
        with neighbour.transaction(elsewhere, "test"):
            assert locks.try_lock_session(elsewhere, locks.LEADER_LOCK)  # another database
        with store.transaction(conn, "test"):
            assert locks.session_lock_holder(conn, locks.LEADER_LOCK) is None
            assert locks.try_lock_session(conn, locks.LEADER_LOCK)
            own_pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with store.transaction(conn, "test"):
            assert locks.session_lock_holder(conn, locks.LEADER_LOCK) == own_pid
        assert not _free(other, "SELECT pg_try_advisory_xact_lock(%s)", locks.LEADER_LOCK)
    finally:
        store.release(conn, broken=True)
        neighbour.release(elsewhere, broken=True)
        neighbour.close()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
