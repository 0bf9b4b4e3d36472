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
leader runs a tick at once.  Timing is APScheduler's interval trigger, and
what is due is decided from stored timestamps, so a wall-clock jump can
make a run early or late but never makes it do work twice.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]

from keyd.backends.base import RenewsCredentials
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
        self._scheduler.add_job(self._tick, "interval", seconds=interval.total_seconds(),
                                id="lifecycle")
        backend = jobs.service.backend
        if isinstance(backend, RenewsCredentials):
            renew_every = jobs.service.settings.scheduler.renew_interval
            self._scheduler.add_job(self.renew, "interval",
                                    seconds=renew_every.total_seconds(), id="renew")

    def renew(self) -> None:
        """Keep the backend's login alive; a failure is logged and retried next time."""
        backend = self.jobs.service.backend
        assert isinstance(backend, RenewsCredentials)
        try:
            backend.renew()
        except KeydError as e:
            log.warning("backend credential renewal failed: %s", e.detail)

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())

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
        if leader and self._scheduler.running:
            job = self._scheduler.get_job("lifecycle")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    @staticmethod
    def _log(report: object) -> None:
        log.debug("jobs ran: %s", report)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
