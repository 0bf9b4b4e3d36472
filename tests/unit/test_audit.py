"""The audit hash chain on SQLite and PostgreSQL: integrity, concurrency, fail-closed."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from keyd.audit import GENESIS, AuditEvent, AuditLog, Broken, EventFilter, payload_hash
from keyd.audit.chain import append
from keyd.clock import SettableClock
from keyd.errors import StoreUnavailable
from keyd.replica import this_replica
from keyd.store import audit as audit_sql
from keyd.store.db import Store
from tests.fixtures.postgres import PG_ADMIN_DSN, read_only_url, upgrade

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(T0)


@pytest.fixture
def log(store: Store, clock: SettableClock) -> Iterator[AuditLog]:
    audit = AuditLog(store, clock)
    try:
        yield audit
    finally:
        audit.close()


def _event(n: int = 0, **kw: Any) -> AuditEvent:
    event = AuditEvent(actor="consent-svc", action="sign.jws", kid="kid-1", purpose="signing",
                       detail={"n": n, "alg": "PS256"},
                       payload_hash=payload_hash(b"payload %d" % n))
    return dataclasses.replace(event, **kw)


def _raw(store: Store, sql: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(sql))


def _chains(store: Store) -> dict[str, list[int]]:
    chains: dict[str, list[int]] = {}
    with store.engine.connect() as conn:
        for segment, seq in conn.execute(
            text("SELECT segment, seq FROM audit_events ORDER BY segment, seq")
        ):
            chains.setdefault(segment, []).append(seq)
    return chains


def _seqs(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT seq FROM audit_events ORDER BY seq"))]


def test_events_link_from_the_genesis_hash_and_verify(log: AuditLog) -> None:
    for n in range(3):
        log.record(_event(n))
    rows = log.list()
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    assert rows[0].detail == {"n": 0, "alg": "PS256"} and rows[0].at == T0
    assert log.verify() is None


def test_verify_of_an_empty_log_is_whole(log: AuditLog) -> None:
    assert log.verify() is None


@pytest.mark.parametrize(
    "edit",
    [
        "actor = 'mallory'",
        "detail = '{\"n\": 99}'",
        "outcome = 'refused'",
        "payload_hash = NULL",
        "kid = 'other-kid'",
    ],
)
def test_editing_one_row_is_reported_at_exactly_that_row(
    log: AuditLog, store: Store, edit: str
) -> None:
    for n in range(5):
        log.record(_event(n))
    _raw(store, f"UPDATE audit_events SET {edit} WHERE seq = 3")  # noqa: S608 - fixed test edits
    assert log.verify() == Broken(this_replica(), 3)


def test_moving_an_event_in_time_is_detected(
    log: AuditLog, store: Store, clock: SettableClock
) -> None:
    for n in range(3):
        clock.advance(timedelta(seconds=1))
        log.record(_event(n))
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET at = :at WHERE seq = 2"),
            {"at": T0 - timedelta(days=1)},
        )
    assert log.verify() == Broken(this_replica(), 2)


def test_deleting_a_middle_row_is_detected_at_the_row_after_it(
    log: AuditLog, store: Store
) -> None:
    for n in range(5):
        log.record(_event(n))
    _raw(store, "DELETE FROM audit_events WHERE seq = 3")
    assert log.verify() == Broken(this_replica(), 4)


def test_deleting_the_first_row_is_detected(log: AuditLog, store: Store) -> None:
    for n in range(3):
        log.record(_event(n))
    _raw(store, "DELETE FROM audit_events WHERE seq = 1")
    assert log.verify() == Broken(this_replica(), 2)


def test_eight_threads_of_200_events_keep_one_contiguous_chain(
    log: AuditLog, store: Store
) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for n in range(200):
                log.record(_event(n, actor=f"svc-{t}"))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _seqs(store) == list(range(1, 1601))
    assert log.verify() is None


def test_two_audit_logs_on_one_database_interleave_without_forking_the_chain(
    store: Store, store_url: str, clock: SettableClock
) -> None:
    other_store = Store(store_url)  # a second engine: another process's view
    logs = [AuditLog(store, clock), AuditLog(other_store, clock)]
    try:
        threads = [
            threading.Thread(target=lambda a=a: [a.record(_event(n)) for n in range(100)])
            for a in logs
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _seqs(store) == list(range(1, 601))
        assert logs[0].verify() is None and logs[1].verify() is None
    finally:
        for a in logs:
            a.close()
        other_store.close()


CHILD = textwrap.dedent(
    """
    import sys
    from keyd.audit import AuditEvent, AuditLog
    from keyd.clock import SystemClock
    from keyd.store.db import Store
    store = Store(sys.argv[1])
    log = AuditLog(store, SystemClock())
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(300):
        log.record(AuditEvent(actor="cli", action="key.list", detail={"n": n}))
    log.close()
    store.close()
    """
)


@pytest.mark.slow  # a second Python process
def test_a_second_process_appending_at_the_same_time_keeps_the_chain_whole(
    log: AuditLog, store: Store, store_url: str
) -> None:
    with subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", CHILD, store_url],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        for n in range(300):  # while the child appends too
            log.record(_event(n))
        assert child.wait(timeout=120) == 0
    # Each process appends to its own segment, each one whole chain.
    chains = _chains(store)
    assert len(chains) == 2 and this_replica() in chains
    assert all(seqs == list(range(1, 301)) for seqs in chains.values())
    assert log.verify() is None
    actors = {r.actor for r in log.list(limit=600)}
    assert actors == {"cli", "consent-svc"}


@pytest.mark.parametrize(
    "detail",
    [
        {"token": "x"},
        {"access_token": "x"},
        {"clientSecret": "x"},
        {"pin": "1234"},
        {"d": "private exponent"},
        {"payload": "{}"},
        {"plaintext_b64": "x"},
        {"jwk": {"kty": "RSA", "qi": "x"}},
        {"keys": [{"password": "x"}]},
    ],
)
def test_detail_that_names_secret_material_is_refused_and_nothing_is_written(
    log: AuditLog, store: Store, detail: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match="secret material"):
        log.record(_event(detail=detail))
    assert _seqs(store) == []


def test_last_seen_is_each_actors_newest_event_among_the_newest_window(
    log: AuditLog, store: Store, clock: SettableClock
) -> None:
    for actor, minutes in [("svc-a", 0), ("svc-b", 1), ("svc-a", 2), ("cli", 3), ("cli", 4)]:
        clock.set(T0 + timedelta(minutes=minutes))
        log.record(_event(actor=actor))
    with store.session() as session:
        everything = audit_sql.last_seen(session, ["svc-a", "svc-b", "nobody"], 100)
        newest_three = audit_sql.last_seen(session, ["svc-a", "svc-b"], 3)
    assert everything == {"svc-a": T0 + timedelta(minutes=2), "svc-b": T0 + timedelta(minutes=1)}
    assert newest_three == {"svc-a": T0 + timedelta(minutes=2)}  # svc-b's event is older


def test_detail_keeps_ordinary_values_and_cuts_long_strings(log: AuditLog) -> None:
    log.record(_event(detail={"client_id": "c1", "audience": "https://as", "size": 2048,
                              "note": "x" * 5000, "when": T0}))
    detail = log.list()[0].detail
    assert detail["client_id"] == "c1" and detail["size"] == 2048
    assert detail["when"] == T0.isoformat()
    assert len(detail["note"]) < 600 and detail["note"].endswith("(truncated)")


def test_an_unknown_outcome_is_refused(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="outcome"):
        log.record(_event(outcome="maybe"))


def test_an_unwritable_store_makes_every_waiting_record_fail_closed(
    store: Store, store_url: str, clock: SettableClock
) -> None:
    read_only = Store(read_only_url(store_url))
    audit = AuditLog(read_only, clock)
    failures: list[BaseException] = []

    def work() -> None:
        for n in range(5):
            try:
                audit.record(_event(n))
            except StoreUnavailable as e:
                failures.append(e)

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        audit.close()
        read_only.close()
    assert len(failures) == 20
    assert all("audit append" in str(e) for e in failures)
    assert _seqs(store) == []


@pytest.mark.postgres
def test_after_its_connection_is_killed_the_writer_fails_once_then_recovers(
    postgres_url: str, clock: SettableClock
) -> None:
    store = Store(postgres_url)
    store.migrate()
    audit = AuditLog(store, clock)
    try:
        audit.record(_event(1))
        database = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
        with pytest.raises(StoreUnavailable, match="audit append"):
            audit.record(_event(2))  # fail closed: this one is not written
        audit.record(_event(3))  # and the next goes through, no restart
        assert [r.detail["n"] for r in audit.list()] == [1, 3]
        assert audit.verify() is None
    finally:
        audit.close()
        store.close()


def test_record_inside_a_session_commits_or_rolls_back_with_it(
    log: AuditLog, store: Store
) -> None:
    with pytest.raises(RuntimeError), store.session(write=True):
        log.record(_event(1, action="key.rotate"))
        raise RuntimeError("the rotation failed half-way")
    assert _seqs(store) == []
    with store.session(write=True):
        log.record(_event(2, action="key.rotate"))
    log.record(_event(3))  # and the writer thread continues the same chain
    assert [r.action for r in log.list()] == ["key.rotate", "sign.jws"]
    assert log.verify() is None


def test_list_filters_and_returns_the_latest_events_in_order(
    log: AuditLog, clock: SettableClock
) -> None:
    for n in range(6):
        clock.set(T0 + timedelta(minutes=n))
        log.record(_event(n, action="sign.jws" if n % 2 else "decrypt.jwe",
                          kid=f"kid-{n % 3}", actor=f"a{n % 2}"))
    assert [r.detail["n"] for r in log.list(limit=2)] == [4, 5]
    from_minute_two = EventFilter(since=T0 + timedelta(minutes=2))
    assert [r.detail["n"] for r in log.list(from_minute_two, limit=2)] == [2, 3]
    assert [r.detail["n"] for r in log.list(EventFilter(action="decrypt.jwe"))] == [0, 2, 4]
    assert [r.detail["n"] for r in log.list(EventFilter(kid="kid-1"))] == [1, 4]
    assert [r.detail["n"] for r in log.list(EventFilter(actor="a1", kid="kid-0"))] == [3]


def test_a_closed_log_refuses_to_record(store: Store, clock: SettableClock) -> None:
    audit = AuditLog(store, clock)
    audit.record(_event())
    audit.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        audit.record(_event())


def test_payload_hash_is_hex_sha256() -> None:
    assert payload_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()


def _legacy_hash(prev: str, seq: int, at: datetime, n: int) -> str:
    """The hash as the code before segments computed it (migration 0004's chain)."""
    body = (f'[{seq},"{at.isoformat(timespec="microseconds")}","svc","sign.jws",'
            f'null,null,"ok","{{\\"n\\":{n}}}",null]')
    return hashlib.sha256((prev + body).encode()).hexdigest()


def test_migration_0005_keeps_the_old_chain_as_the_legacy_segment(
        store_url: str, clock: SettableClock) -> None:
    store = Store(store_url)
    try:
        with store.engine.begin() as conn:
            upgrade(conn, "0004")
            prev = GENESIS
            for seq in (1, 2, 3):
                at = T0 + timedelta(seconds=seq)
                digest = _legacy_hash(prev, seq, at, seq)
                conn.execute(text(
                    "INSERT INTO audit_events (seq, at, actor, action, outcome, detail, "
                    "prev_hash, hash) VALUES (:seq, :at, 'svc', 'sign.jws', 'ok', :detail, "
                    ":prev, :hash)"), {"seq": seq, "at": at, "detail": f'{{"n":{seq}}}',
                                       "prev": prev, "hash": digest})
                prev = digest
        store.migrate()
        log = AuditLog(store, clock)
        try:
            assert [(r.segment, r.seq) for r in log.list()] == [("legacy", n) for n in (1, 2, 3)]
            assert log.verify() is None
            clock.advance(timedelta(minutes=1))
            log.record(_event(1))
            assert [(r.segment, r.seq) for r in log.list()][-1] == (this_replica(), 1)
            assert log.verify() is None
            anchor = log.head()
            assert anchor[0] == 4 and log.reaches(*anchor) is None
            _raw(store, "UPDATE audit_events SET actor = 'mallory' "
                        "WHERE segment = 'legacy' AND seq = 2")
            assert log.verify() == Broken("legacy", 2)
            why = log.reaches(*anchor)
            assert why is None  # the anchor's events are untouched: verify() names the edit
        finally:
            log.close()
    finally:
        store.close()


def test_an_unknown_head_is_refused_and_every_segment_is_checked(
        log: AuditLog, store: Store, store_url: str, clock: SettableClock) -> None:
    other_store = Store(store_url)
    other = AuditLog(other_store, clock)
    try:
        for n in range(3):
            log.record(_event(n))
        # Another segment: as if another replica (here: a name of our own) appended.
        with store.engine.begin() as conn:
            append(conn, "replica-b:1", [log._prepare(_event(n)) for n in range(4)])
        length, digest = log.head()
        assert length == 7 and other.head() == (length, digest)
        assert log.reaches(length, digest) is None
        assert log.reaches(length, "f" * 64) == (
            "this store never had that head: it was rewritten or is another store")
        assert log.reaches(length + 1, digest) is not None
        _raw(store, "DELETE FROM audit_events WHERE segment = 'replica-b:1' AND seq > 2")
        assert log.verify() is None  # what is left of each segment still links up
        why = log.reaches(length, digest)
        assert why is not None and "segment replica-b:1 has 2 events" in why and "cut off" in why
        [(segment, seq)] = [(r.segment, r.seq) for r in log.page(limit=1)]
        # One instant for all (the clock stands still): newest by segment, then seq.
        assert (segment, seq) == max((this_replica(), 3), ("replica-b:1", 2))
        older = log.page(before=(segment, seq), limit=100)
        assert len(older) == 4 and (segment, seq) not in {(r.segment, r.seq) for r in older}
    finally:
        other.close()
        other_store.close()
