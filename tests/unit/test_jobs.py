"""The reconciler through the real KeyService (local backend, SQLite), time moved
by a SettableClock: rotation, pre-publication, overlap, destruction, revocation,
clock jumps, production CSRs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyd.clock import SettableClock
from keyd.errors import Conflict
from keyd.jobs import Jobs
from keyd.model import KeyState, Purpose
from keyd.service import KeyService
from tests.fixtures.certs import FakeCA
from tests.fixtures.service import DAY, T0, Recorder, by_state, jobs_for, open_service


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(T0)


@pytest.fixture
def env(tmp_path: Path, clock: SettableClock) -> Iterator[tuple[KeyService, Jobs, Recorder]]:
    service = open_service(tmp_path, clock)
    service.init()
    recorder = Recorder()
    try:
        yield service, jobs_for(service, recorder), recorder
    finally:
        service.close()


def states(service: KeyService, purpose: Purpose = Purpose.SIGNING) -> list[KeyState]:
    return [k.state for k in service.keys() if k.purpose is purpose]


def jwks_kids(service: KeyService) -> set[str]:
    service.invalidate()
    return {k["kid"] for k in json.loads(service.jwks()[0])["keys"]}


def test_scheduled_rotation_publishes_then_activates_then_destroys(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock) -> None:
    service, jobs, _ = env
    first = by_state(service, KeyState.ACTIVE)[0]
    clock.advance(90 * DAY)
    jobs.run()
    new = by_state(service, KeyState.PENDING)[0]
    assert new.kid in jwks_kids(service)  # published ahead of use
    assert service.active_key(Purpose.SIGNING).kid == first.kid
    clock.advance(2 * DAY - timedelta(minutes=1))
    jobs.run()
    assert by_state(service, KeyState.PENDING)[0].id == new.id
    clock.advance(timedelta(minutes=1))
    jobs.run()
    service.invalidate()
    assert service.active_key(Purpose.SIGNING).kid == new.kid
    assert by_state(service, KeyState.RETIRED)[0].id == first.id
    assert {first.kid, new.kid} <= jwks_kids(service)
    clock.advance(7 * DAY - timedelta(minutes=1))
    jobs.run()
    assert first.kid in jwks_kids(service)
    clock.advance(timedelta(minutes=1))
    jobs.run()
    assert first.kid not in jwks_kids(service)
    assert by_state(service, KeyState.DESTROYED)[0].id == first.id
    held, known = service.backend_refs()
    assert held == {ref for ref, (_, s) in known.items() if s is not KeyState.DESTROYED}
    actions = [r.action for r in service.audit.list(limit=200)]
    assert {"key.create", "key.activate", "key.retire", "key.destroy"} <= set(actions)


def test_running_the_reconciler_twice_changes_nothing_the_second_time(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock) -> None:
    service, jobs, _ = env
    clock.advance(90 * DAY)
    assert jobs.run().done
    before = service.keys()
    assert jobs.run().done == []
    assert service.keys() == before


def test_clock_jump_forward_24h_and_back_1h_rotates_once_and_destroys_nothing_early(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock) -> None:
    service, jobs, _ = env
    clock.advance(90 * DAY)
    jobs.run()  # rotation starts: one pending
    clock.advance(timedelta(hours=24))
    jobs.run()
    clock.advance(timedelta(hours=-1))
    jobs.run()
    assert states(service).count(KeyState.PENDING) == 1
    assert states(service).count(KeyState.ACTIVE) == 1
    clock.advance(timedelta(hours=25))  # prepublish over
    jobs.run()
    retired = by_state(service, KeyState.RETIRED)[0]
    clock.advance(timedelta(hours=-1))
    jobs.run()
    clock.advance(timedelta(hours=24))
    jobs.run()
    assert by_state(service, KeyState.RETIRED)[0].id == retired.id  # overlap is 7 days
    assert len(service.keys()) == 2 + 2  # two signing, two encryption: no double rotation


def test_admin_rotation_waits_for_prepublish_unless_now(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock) -> None:
    service, jobs, _ = env
    old = service.active_key(Purpose.SIGNING)
    started = service.rotate(Purpose.SIGNING, actor="test")
    assert started.state is KeyState.PENDING
    with pytest.raises(Conflict, match="rotation is under way"):
        service.rotate(Purpose.SIGNING, actor="test")
    jobs.run()
    service.invalidate()
    assert service.active_key(Purpose.SIGNING).kid == old.kid
    forced = service.rotate(Purpose.SIGNING, actor="test", now=True)
    assert forced.id == started.id and forced.state is KeyState.ACTIVE
    service.invalidate()
    assert service.active_key(Purpose.SIGNING).kid == started.kid


def test_revoking_the_active_key_activates_a_replacement_at_once(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock) -> None:
    service, _, _ = env
    old = service.active_key(Purpose.SIGNING)
    info, replacement = service.revoke(old.kid, reason="compromised", actor="test")
    assert info.state is KeyState.REVOKED
    assert replacement is not None and replacement.state is KeyState.ACTIVE
    service.invalidate()
    assert service.active_key(Purpose.SIGNING).kid == replacement.kid
    assert old.kid not in jwks_kids(service)
    assert service.published_key(old.kid) is None  # refused for every operation
    assert old.ref not in service.backend.list_refs()  # erased from the backend
    with pytest.raises(Conflict):
        service.csr(old.kid, actor="test")


def test_revoking_the_active_key_prefers_an_existing_pending_key(
        env: tuple[KeyService, Jobs, Recorder]) -> None:
    service, _, _ = env
    pending = service.rotate(Purpose.ENCRYPTION, actor="test")
    old = service.active_key(Purpose.ENCRYPTION)
    _, replacement = service.revoke(old.kid, reason="test", actor="test")
    assert replacement is not None and replacement.id == pending.id
    assert states(service, Purpose.ENCRYPTION).count(KeyState.ACTIVE) == 1


def test_recovery_erases_orphans_and_revokes_keys_the_backend_lost(
        env: tuple[KeyService, Jobs, Recorder]) -> None:
    service, jobs, recorder = env
    orphan = service.backend.generate(Purpose.SIGNING, 2048).ref
    lost = service.active_key(Purpose.ENCRYPTION)
    service.backend.destroy(lost.ref)
    report = jobs.run(startup=True)
    assert not report.errors, report.errors
    assert orphan not in service.backend.list_refs()
    assert by_state(service, KeyState.REVOKED, Purpose.ENCRYPTION)[0].kid == lost.kid
    service.invalidate()
    assert service.active_key(Purpose.ENCRYPTION).kid != lost.kid
    assert any(a.subject == f"lost:{by_state(service, KeyState.REVOKED, Purpose.ENCRYPTION)[0].id}"
               for a in recorder.sent)


def test_production_rotation_waits_for_the_certificate_and_alerts_once(
        tmp_path: Path, clock: SettableClock) -> None:
    clock.set(datetime.now(UTC))  # the test CA dates its certificates from the real now
    tables = {"keyd": {"mode": "production"}}
    service = open_service(tmp_path, clock, tables)
    recorder = Recorder()
    try:
        ca = FakeCA()
        for key in service.init():
            service.import_certificate(key.id, ca.issue(service.csr(key.id, actor="t")),
                                       actor="t")
        jobs = jobs_for(service, recorder)
        old = service.active_key(Purpose.SIGNING)
        clock.advance(365 * DAY)  # production rotate_after, and the test CA's dates
        jobs.run()
        jobs.run()
        awaiting = by_state(service, KeyState.AWAITING_CERTIFICATE)
        assert len(awaiting) == 1
        csr_alerts = [a for a in recorder.sent if a.subject == f"csr:{awaiting[0].id}"]
        assert len(csr_alerts) == 1
        service.invalidate()
        assert service.active_key(Purpose.SIGNING).kid == old.kid
    finally:
        service.close()


def test_a_failing_purpose_does_not_stop_the_others(
        env: tuple[KeyService, Jobs, Recorder], clock: SettableClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    service, jobs, recorder = env
    real = service.backend.generate

    def generate(purpose: Purpose, size: int, *, exportable: bool = False) -> Any:
        if purpose is Purpose.SIGNING:  # the one fault we cannot produce for real
            raise Conflict("injected generate failure")
        return real(purpose, size, exportable=exportable)

    monkeypatch.setattr(service.backend, "generate", generate)
    clock.advance(90 * DAY)
    report = jobs.run()
    assert any("signing" in e for e in report.errors)
    assert len(by_state(service, KeyState.PENDING, Purpose.ENCRYPTION)) == 1
    failures = [a for a in recorder.sent if a.subject.startswith("job:signing")]
    jobs.run()
    assert len([a for a in recorder.sent if a.subject.startswith("job:signing")]) == len(failures)
