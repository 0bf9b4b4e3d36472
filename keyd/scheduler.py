"""APScheduler wiring, nothing else: run the jobs every interval.

(`keyd serve` runs them once itself before it opens its listeners.)

``coalesce=True`` with no misfire limit: runs missed while the process could
not run them (a suspended host, a long GC, a busy run) are made up once, not
once per missed interval.  Downtime across restarts needs no bookkeeping: the
start-up run reconciles from stored state.  ``max_instances=1``: a slow run is
never overlapped by the next.

Every replica runs this scheduler, but a lifecycle tick does work only on
the replica holding the lease (keyd/lease.py), with its lifecycle writes
fenced by the lease's epoch.  Each leader tick includes recovery; becoming
leader runs a tick at once.

The lifecycle tick runs on its own thread timed by ``Event.wait`` (the
monotonic clock), not by APScheduler, whose interval trigger is wall-clock:
after the clock is set back an hour it would sleep an hour.  What is due is
decided from stored timestamps, so a jump never makes a tick do work twice.
APScheduler keeps the credential renewal.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]

from keyd.errors import KeydError
from keyd.jobs import Jobs, Report
from keyd.lease import Lease

log = logging.getLogger("keyd.scheduler")


class Scheduler:
    def __init__(self, jobs: Jobs, lease: Lease | None = None) -> None:
        self.jobs = jobs
        self.lease = lease
        interval = jobs.service.settings.scheduler.interval
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._interval = interval.total_seconds()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        if jobs.service.renews_credentials():
            renew_every = jobs.service.settings.scheduler.renew_interval
            self._scheduler.add_job(self.renew, "interval",
                                    seconds=renew_every.total_seconds(), id="renew")

    def renew(self) -> None:
        """Keep the backend's login alive; a failure is logged and retried next time."""
        try:
            self.jobs.service.renew_credentials()
        except KeydError as e:
            log.warning("backend credential renewal failed: %s", e.detail)

    def job_ids(self) -> list[str]:
        return sorted(["lifecycle", *(job.id for job in self._scheduler.get_jobs())])

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)  # monotonic: wall-clock jumps change nothing
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the next tick still comes
                log.exception("lifecycle tick failed")

    def _tick(self) -> None:
        report = self.run_if_leader()
        if report is not None:
            self._log(report)

    def run_if_leader(self) -> Report | None:
        """The jobs (recovery included), fenced by the lease; None on a follower."""
        lease = self.lease
        if lease is not None and not lease.is_leader():
            return None
        fence: AbstractContextManager[None] = (
            nullcontext() if lease is None else self.jobs.service.fenced(lease.fence))
        with fence:
            return self.jobs.run(startup=True)

    def wake(self, leader: bool) -> None:
        """Run a tick now (the lease listener: this replica just became leader)."""
        if leader:
            self._wake.set()

    @staticmethod
    def _log(report: object) -> None:
        log.debug("jobs ran: %s", report)

    def start(self) -> None:
        self._scheduler.start()
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._loop, name="keyd-lifecycle",
                                                 daemon=True)
            self._loop_thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._loop_thread is not None:
            self._loop_thread.join()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
