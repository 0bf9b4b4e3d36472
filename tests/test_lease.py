"""One leader, on SQLite (flock across the processes of one host) and PostgreSQL
(session advisory lock + epoch row): one holder at a time, a killed holder is
replaced within the lease, an expired one is pushed out, and a lost leader's
lifecycle writes are refused by the epoch fence."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from keyd.clock import SettableClock
from keyd.errors import ClockSkewed, LeaseLost
from keyd.lease import Lease
from keyd.model import KeyState, Purpose
from keyd.scheduler import Scheduler
from keyd.store.db import Store
from tests.test_jobs import T0, Recorder, jobs_for, open_service

LENGTH = timedelta(seconds=2)
# Liveness bound for waits on events (a hung test fails instead of hanging).
WAIT = 10 * LENGTH.total_seconds()


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[Store, Store]]:
    """Two engines on one database: two processes, as far as leases go."""
    a, b = Store(store_url), Store(store_url)
    a.migrate()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_one_holder_at_a_time_and_a_clean_stop_hands_over_with_a_higher_epoch(
        stores: tuple[Store, Store]) -> None:
    a = Lease(stores[0], LENGTH, replica="a")
    b = Lease(stores[1], LENGTH, replica="b")
    try:
        assert a.tick() and not b.tick()
        assert a.tick() and not b.tick()  # renewal keeps it
        first = a.epoch
        assert first is not None and a.state().leader
        a.stop()
        assert not a.is_leader()
        assert b.tick()
        assert b.epoch == first + 1
        assert b.state().to_json()["lease_expires_at"] is not None
    finally:
        a.stop()
        b.stop()

@pytest.mark.slow  # a process killed mid-lease
def test_a_killed_leader_process_is_replaced_within_the_lease(
        tmp_path: Path, store_url: str, stores: tuple[Store, Store]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from datetime import timedelta
        from keyd.lease import Lease
        from keyd.store.db import Store
        lease = Lease(Store({store_url!r}), timedelta(seconds=2), replica="doomed")
        print("leader" if lease.tick() else "follower", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    follower = Lease(stores[1], LENGTH, replica="heir")
    took_over = threading.Event()
    follower.on_change = lambda leader: took_over.set() if leader else None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leader"
        assert not follower.tick()
        follower.start()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert took_over.wait(WAIT), "no new leader after the holder was killed"
        assert follower.is_leader() and follower.epoch == 2
    finally:
        holder.kill()
        holder.communicate()  # waits and closes the pipes
        follower.stop()


@pytest.mark.postgres
def test_a_leader_that_stops_renewing_is_pushed_out_and_its_late_writes_are_refused(
        tmp_path: Path, postgres_url: str) -> None:
    """The black-holed leader: its connection (and advisory lock) stay open on the
    server, but its lease row expires; a candidate ends its session and leads."""
    clock = SettableClock(T0)
    service = open_service(tmp_path, clock, {"store": {"url": postgres_url}})
    other = Store(postgres_url)
    try:
        service.init()
        old = Lease(service.store, LENGTH, replica="stuck")
        new = Lease(other, LENGTH, replica="next")
        assert old.tick() and not new.tick()
        # The stuck leader's renewals stop; its row runs out (time moved on the server).
        with other.engine.begin() as conn:
            conn.execute(text("UPDATE leases SET expires_at = clock_timestamp() - "
                              "interval '1 second'"))
        assert new.tick() or new.tick()
        assert new.epoch == 2
        with pytest.raises(LeaseLost), service.fenced(old.fence):
            service.rotate(Purpose.SIGNING, actor="scheduler")
        assert not old.tick()  # its session was ended: it knows it lost
        assert [k for k in service.keys() if k.state is KeyState.PENDING] == []
        new.stop()
        old.stop()
    finally:
        other.close()
        service.close()


def test_only_the_leader_runs_the_scheduled_jobs_and_a_new_leader_runs_them_at_once(
        tmp_path: Path, store_url: str) -> None:
    clock = SettableClock(T0)
    # Two processes of one host: one config, one store, one backend.
    first = open_service(tmp_path, clock, {"store": {"url": store_url}})
    second = open_service(tmp_path, clock)
    try:
        first.init()
        leases = [Lease(first.store, LENGTH, replica="r1"), Lease(second.store, LENGTH,
                                                                  replica="r2")]
        schedulers = [Scheduler(jobs_for(svc, Recorder()), lease)
                      for svc, lease in zip((first, second), leases, strict=True)]
        assert leases[0].tick() and not leases[1].tick()
        clock.advance(timedelta(days=90))  # a rotation is due
        assert schedulers[1].run_if_leader() is None  # the follower does nothing
        report = schedulers[0].run_if_leader()
        assert report is not None and any("create" in d for d in report.done), report
        leases[0].stop()
        assert leases[1].tick()
        assert schedulers[1].run_if_leader() is not None
        pending = [k for k in second.keys() if k.state is KeyState.PENDING]
        assert len(pending) == 2  # one per purpose: the new leader did not rotate again
        leases[1].stop()
    finally:
        second.close()
        first.close()


def test_a_replica_whose_clock_drifts_while_running_stops_leading_and_writing_until_fixed(
        tmp_path: Path, store_url: str) -> None:
    """The start-up skew check, made periodic: every lease tick measures the
    injected clock against the database's."""
    clock = SettableClock(datetime.now(UTC))
    service = open_service(tmp_path, clock, {"store": {"url": store_url}})
    other = Store(store_url)
    on_time = Lease(other, LENGTH, replica="on-time")
    try:
        service.init()
        drifting = Lease(service.store, LENGTH, replica="drifting", clock=clock)
        service.lease = drifting
        clock.set(datetime.now(UTC))
        assert drifting.tick() and drifting.clock_error is None
        assert service.ready()["checks"]["clock"] == "ok"
        clock.set(datetime.now(UTC) + timedelta(seconds=30))  # NTP lost; the clock ran ahead
        assert not drifting.tick() and not drifting.is_leader()
        assert drifting.clock_error is not None
        assert re.search(r"clock is \d\d\.\ds off the database.s \(at most 5s",
                         drifting.clock_error)
        ready = service.ready()
        assert ready["ready"] is False and ready["leader"] is False
        assert ready["checks"]["clock"] == drifting.clock_error
        with pytest.raises(ClockSkewed, match="replica drifting makes no lifecycle writes"):
            service.rotate(Purpose.SIGNING, actor="admin")
        assert [k for k in service.keys() if k.state is KeyState.PENDING] == []
        assert on_time.tick()  # handed back: another replica leads at once
        clock.set(datetime.now(UTC))  # time sync fixed
        assert not drifting.tick() and drifting.clock_error is None
        assert service.ready()["checks"]["clock"] == "ok"
        assert service.rotate(Purpose.SIGNING, actor="admin").state is KeyState.PENDING
        drifting.stop()
    finally:
        on_time.stop()
        other.close()
        service.close()
