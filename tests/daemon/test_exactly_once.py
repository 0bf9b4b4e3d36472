"""Exactly once, on SQLite and PostgreSQL: one waiting and one active key per
purpose by the schema, concurrent rotations (threads and processes) make one
new key, forced rotations are serialised, the published-key cap holds, and
recovery never erases a key a live process is making."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from keyd.alerts import Alert, Alerter
from keyd.clock import SettableClock
from keyd.errors import Conflict, KeydError, RotationUnderWay
from keyd.jobs import Jobs
from keyd.model import KeyState, Purpose
from keyd.replica import host, this_replica
from keyd.service import KeyInfo, KeyService
from keyd.store import queries
from keyd.store.db import Store
from keyd.store.tables import KeyIntent, KeyVersion
from tests.fixtures.daemon import KEYD, keyd, running, write_config
from tests.fixtures.postgres import upgrade
from tests.fixtures.service import Recorder, jobs_for, open_service

T0 = datetime(2030, 1, 1, tzinfo=UTC)
THREADS = 12
PROCESSES = 6


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(T0)


@pytest.fixture
def service(tmp_path: Path, clock: SettableClock, store_url: str) -> Iterator[KeyService]:
    """An initialised KeyService (local backend) on SQLite and on PostgreSQL."""
    svc = open_service(tmp_path, clock, {"store": {"url": store_url}})
    svc.init()
    try:
        yield svc
    finally:
        svc.close()


def at_once(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` on n threads released together; each result or exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def of(service: KeyService, purpose: Purpose, state: KeyState) -> list[KeyInfo]:
    return [k for k in service.keys() if k.purpose is purpose and k.state is state]


def no_orphans(service: KeyService) -> None:
    held, known = service.backend_refs()
    live = {ref for ref, (_, state) in known.items()
            if state not in (KeyState.DESTROYED, KeyState.REVOKED)}
    assert held == live, held ^ live


def _row(purpose: str, state: KeyState, **kw: Any) -> KeyVersion:
    fields: dict[str, Any] = {
        "purpose": purpose, "state": state.value, "backend": "local", "backend_ref": "r",
        "key_size": 2048, "created_at": T0, "state_changed_at": T0, "public_key_pem": "-",
    }
    return KeyVersion(**{**fields, **kw})


def test_the_schema_refuses_a_second_waiting_or_active_key_per_purpose(store: Store) -> None:
    with store.session() as s:
        s.add(_row("signing", KeyState.ACTIVE))
        s.add(_row("signing", KeyState.PENDING))
        s.add(_row("signing", KeyState.RETIRED))
        s.add(_row("signing", KeyState.RETIRED))
        s.add(_row("encryption", KeyState.ACTIVE))
    for state in (KeyState.ACTIVE, KeyState.PENDING, KeyState.AWAITING_CERTIFICATE):
        with pytest.raises(Conflict, match="refused by the database"), store.session() as s:
            s.add(_row("signing", state))
    with store.session() as s:
        assert len(queries.all_keys(s)) == 5


def test_migration_0002_repairs_a_store_the_old_code_left_with_surplus_keys(
        store_url: str) -> None:
    store = Store(store_url)
    try:
        with store.engine.begin() as conn:
            upgrade(conn, "0001")
        with store.session() as s:
            for i in range(3):  # the storm: three pending signing keys
                s.add(_row("signing", KeyState.PENDING, id=f"p{i}",
                           publish_at=T0 + timedelta(hours=i)))
            s.add(_row("signing", KeyState.AWAITING_CERTIFICATE, id="w0"))
            s.add(_row("encryption", KeyState.ACTIVE, id="a0", activated_at=T0))
            s.add(_row("encryption", KeyState.ACTIVE, id="a1",
                       activated_at=T0 + timedelta(days=1)))
        store.migrate()
        with store.session() as s:
            state = {k.id: k.state for k in queries.all_keys(s)}
            version = s.connection().execute(text("SELECT version_num FROM alembic_version"))
            assert version.scalar_one() == "0005"
        # The pending key published longest stays; the others keep decrypting as retired.
        assert state == {"p0": "pending", "p1": "retired", "p2": "retired", "w0": "revoked",
                         "a0": "retired", "a1": "active"}
    finally:
        store.close()


def test_concurrent_rotations_on_threads_make_exactly_one_pending_key(
        service: KeyService) -> None:
    results = at_once(THREADS, lambda i: service.rotate(Purpose.SIGNING, actor=f"t{i}"))
    made = [r for r in results if isinstance(r, KeyInfo)]
    refused = [r for r in results if isinstance(r, RotationUnderWay)]
    assert len(made) == 1 and len(refused) == THREADS - 1, results
    assert [k.id for k in of(service, Purpose.SIGNING, KeyState.PENDING)] == [made[0].id]
    no_orphans(service)
    assert service.audit.verify() is None

@pytest.mark.slow  # keyd processes
def test_concurrent_rotations_in_separate_processes_make_exactly_one_pending_key(
        tmp_path: Path, store_url: str) -> None:
    cfg = write_config(tmp_path, {"lifecycle.transport": {"enabled": False},
                                  "store": {"url": store_url}})
    keyd(cfg, "init")
    procs = [subprocess.Popen([*KEYD, "--config", str(cfg), "rotate", "signing"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ))
             for _ in range(PROCESSES)]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    ok = [o for o in outcomes if o[0] == 0]
    refused = [o for o in outcomes if o[0] == 1]
    assert len(ok) == 1 and len(refused) == PROCESSES - 1, outcomes
    for _, _, err in refused:
        assert err.count("\n") == 1 and "rotation is under way" in err, err
    keys = json.loads(keyd(cfg, "keys", "list", "--json").stdout)
    assert [k["state"] for k in keys if k["purpose"] == "signing"].count("pending") == 1
    assert keyd(cfg, "audit", "verify").stdout.startswith("audit chain intact")

@pytest.mark.slow  # a real daemon
def test_a_second_rotation_names_the_pending_kid_and_when_it_activates(tmp_path: Path) -> None:
    tables: dict[str, dict[str, Any]] = {"lifecycle.transport": {"enabled": False},
                                         "lifecycle.signing": {"prepublish": "2d"}}
    with running(tmp_path, tables) as daemon, daemon.client(daemon.admin_token) as admin:
        first = admin.post("/v1/keys/signing/rotate", json={})
        assert first.status_code == 200, first.text
        kid = first.json()["key"]["kid"]
        again = admin.post("/v1/keys/signing/rotate", json={})
        assert again.status_code == 409
        body = again.json()
        assert body["error"] == "rotation_under_way"
        assert kid in body["detail"] and "activates at 20" in body["detail"]
        cli = keyd(daemon.config, "rotate", "signing", check=False)
        assert cli.returncode == 1 and cli.stderr.count("\n") == 1
        assert kid in cli.stderr and "activates at" in cli.stderr
        listed = json.loads(keyd(daemon.config, "keys", "list", "--json").stdout)
        pending = next(k for k in listed if k["kid"] == kid)
        assert pending["activates_at"] is not None and pending["activates_at"] in body["detail"]


def test_concurrent_forced_rotations_are_serialised_into_one_new_active_key(
        service: KeyService) -> None:
    before = of(service, Purpose.ENCRYPTION, KeyState.ACTIVE)[0]
    results = at_once(THREADS, lambda i: service.rotate(Purpose.ENCRYPTION, actor=f"t{i}",
                                                        now=True))
    assert all(isinstance(r, KeyInfo) for r in results), results
    active = of(service, Purpose.ENCRYPTION, KeyState.ACTIVE)
    assert len(active) == 1 and active[0].id != before.id
    # Every caller got the key that replaced the one it found: one new key for all.
    assert {r.id for r in results} == {active[0].id}
    assert [k.id for k in of(service, Purpose.ENCRYPTION, KeyState.RETIRED)] == [before.id]
    no_orphans(service)
    assert service.audit.verify() is None


def test_a_forced_rotation_activates_a_pending_key_rather_than_making_another(
        service: KeyService) -> None:
    pending = service.rotate(Purpose.SIGNING, actor="test")
    forced = service.rotate(Purpose.SIGNING, actor="test", now=True)
    assert forced.id == pending.id and forced.state is KeyState.ACTIVE
    assert of(service, Purpose.SIGNING, KeyState.PENDING) == []


def test_a_rotation_that_would_publish_more_than_max_published_keys_is_refused(
        tmp_path: Path, clock: SettableClock) -> None:
    svc = open_service(tmp_path, clock, {"lifecycle.signing": {"max_published": 3}})
    try:
        svc.init()
        svc.rotate(Purpose.SIGNING, actor="test", now=True)  # 2 published
        svc.rotate(Purpose.SIGNING, actor="test", now=True)  # 3 published
        with pytest.raises(Conflict, match="3 published keys and max_published is 3"):
            svc.rotate(Purpose.SIGNING, actor="test", now=True)
        with pytest.raises(Conflict, match="max_published"):
            svc.rotate(Purpose.SIGNING, actor="test")
        assert len([k for k in svc.keys() if k.purpose is Purpose.SIGNING
                    and k.state.published]) == 3
    finally:
        svc.close()


def test_recovery_spares_a_live_process_key_intent_and_erases_a_dead_or_stale_one(
        service: KeyService, clock: SettableClock) -> None:
    jobs: Jobs = jobs_for(service, Recorder())
    backend = service.backend
    # A process on another host is making a signing key: its intent has no ref yet,
    # and the backend already holds a key nobody stored (it may be that one).
    made = backend.generate(Purpose.SIGNING, 2048)
    with service.store.session(write=True) as s:
        queries.claim_intent(s, KeyIntent(id="kv_elsewhere", purpose=Purpose.SIGNING,
                                          replica="other-host:4242", created_at=T0))
        # A process of this host that died while making an encryption key.
        queries.claim_intent(s, KeyIntent(id="kv_dead", purpose=Purpose.ENCRYPTION,
                                          replica=f"{host()}:{_dead_pid()}", created_at=T0))
    jobs.recover()
    with service.store.session() as s:
        assert [i.id for i in queries.all_intents(s)] == ["kv_elsewhere"]
    assert made.ref in backend.list_refs()  # spared: the live intent may own it
    with pytest.raises(RotationUnderWay, match="being made by other-host:4242"):
        service.rotate(Purpose.SIGNING, actor="test")
    clock.advance(service.settings.scheduler.intent_grace)
    jobs.recover()
    with service.store.session() as s:
        assert queries.all_intents(s) == []
    assert made.ref not in backend.list_refs()
    no_orphans(service)
    assert service.rotate(Purpose.SIGNING, actor="test").state is KeyState.PENDING


def test_a_key_whose_intent_recovery_erased_is_never_stored(service: KeyService) -> None:
    key_id = service.claim(Purpose.SIGNING, cap=True)
    with service.store.session() as s:
        intent = queries.intent_for(s, "signing")
    assert intent is not None and intent.replica == this_replica()
    assert service.abandon_intent(intent, actor="test")
    with pytest.raises(KeydError, match="erased by recovery"):
        service.create_key(Purpose.SIGNING, actor="test", claimed=key_id)
    assert of(service, Purpose.SIGNING, KeyState.PENDING) == []
    no_orphans(service)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_alert_is_claimed_in_the_store_and_sent_once_by_racing_processes(
        service: KeyService, clock: SettableClock, store_url: str) -> None:
    """Two stores on one database stand for two replicas; each alert goes out once."""
    other = Store(store_url)
    try:
        sent = Recorder()
        alerters = [Alerter(service.settings, store, clock, on_sent=sent)
                    for store in (service.store, other)]
        alert = Alert(subject="certificate:abc", title="expires", text="soon")

        def race(i: int) -> bool:
            return alerters[i % 2].once(alert, "1d", repeat=timedelta(days=1))

        assert sum(at_once(THREADS, race)) == 1
        assert len(sent.sent) == 1
        clock.advance(timedelta(hours=23))
        assert sum(at_once(THREADS, race)) == 0
        clock.advance(timedelta(hours=1))  # the daily repeat: again exactly once
        assert sum(at_once(THREADS, race)) == 1
        assert len(sent.sent) == 2
    finally:
        other.close()
