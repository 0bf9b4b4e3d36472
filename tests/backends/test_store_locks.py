"""The advisory locks: one helper, and the same keys as every earlier keyd
version, so old and new processes on one database exclude each other."""

from __future__ import annotations

import secrets
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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


# ---------------------------------------------------------------- SQLite's writer turn


def test_the_writer_turn_is_a_0600_file_beside_the_database(tmp_path: Path) -> None:
    turn = locks.WriterTurn(tmp_path / "keyd.db")
    with turn.taken():
        assert stat.S_IMODE((tmp_path / "keyd.db-writer.lock").stat().st_mode) == 0o600
    turn.close()


def test_another_process_holding_the_turn_makes_a_writer_wait_then_defer_to_sqlite(
        tmp_path: Path) -> None:
    """A holder in another process keeps the turn; past its patience the writer
    goes ahead (SQLite's busy timeout decides), and once free it takes the turn."""
    lock_file = tmp_path / "keyd.db-writer.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        impatient = locks.WriterTurn(tmp_path / "keyd.db", patience=0.05)
        fd = impatient._open()
        assert fd is not None and impatient._acquire(fd) is False
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        assert impatient._acquire(fd) is True
        impatient.close()
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes its pipes


def test_a_lock_file_that_cannot_be_made_leaves_the_queue_to_sqlite(tmp_path: Path) -> None:
    """A folder where the lock file cannot be created: the writer still writes."""
    turn = locks.WriterTurn(tmp_path / "missing-folder" / "keyd.db")
    with turn.taken():
        pass
    assert not (tmp_path / "missing-folder").exists()
    turn.close()


def test_threads_of_one_process_take_the_turn_one_at_a_time(tmp_path: Path) -> None:
    turn = locks.WriterTurn(tmp_path / "keyd.db")
    inside: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with turn.taken():
            inside.append("first in")
            first_in.set()
            release_first.wait(10)
            inside.append("first out")

    def second() -> None:
        with turn.taken():
            inside.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(10)
    b = threading.Thread(target=second)
    b.start()
    release_first.set()
    a.join(10)
    b.join(10)
    assert inside == ["first in", "first out", "second in"]
    turn.close()


def test_a_postgresql_store_has_no_turn_to_wait_for(postgres_url: str) -> None:
    store = Store(postgres_url)
    try:
        with store.writer_turn():
            pass
        assert store.file_path() is None
    finally:
        store.close()
