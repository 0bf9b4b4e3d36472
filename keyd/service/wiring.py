"""Wiring: opening the store and the backend, closing them, the replica's lease,
and the health answers (readiness, the replicas seen)."""

from __future__ import annotations

from datetime import timedelta
from typing import Self

from keyd import deployment
from keyd.audit import AuditLog
from keyd.backends import open_backend
from keyd.backends.base import RenewsCredentials
from keyd.clock import Clock, SystemClock, utc
from keyd.config import Settings
from keyd.errors import KeydError, KeyNotFound
from keyd.lease import Lease
from keyd.replica import this_replica
from keyd.store import queries
from keyd.store.db import Store

from .publication import Publication
from .values import rfc3339


class Wiring(Publication):
    @classmethod
    def open(
        cls, settings: Settings, clock: Clock | None = None, *, require_backend: bool = True
    ) -> Self:
        """Store migrated to head, backend checked, policies loaded."""
        store = Store(settings.store.url)
        try:
            store.migrate()
            store_id = deployment.check(store, settings)
            backend = open_backend(settings, require_up=require_backend)
        except BaseException:
            store.close()
            raise
        try:
            claimed = deployment.claim_backend(backend, store_id, required=require_backend)
        except BaseException:
            backend.close()
            store.close()
            raise
        clock = clock or SystemClock()
        service = cls(settings, store, backend, AuditLog(store, clock), clock)
        service._unclaimed_store = None if claimed else store_id
        return service

    def close(self) -> None:
        for issuer in self.issuers.values():
            issuer.close()
        self.audit.close()
        self.backend.close()
        self.store.close()

    def renews_credentials(self) -> bool:
        """Does the backend hold a login that must be renewed (Vault's token)?"""
        return isinstance(self.backend, RenewsCredentials)

    def renew_credentials(self) -> None:
        """Renew the backend's login (only where ``renews_credentials``)."""
        backend = self.backend
        assert isinstance(backend, RenewsCredentials)
        backend.renew()

    def check_clock(self) -> None:
        """Refuse to serve when this host's clock is far from the store's."""
        deployment.check_clock(self.store, self.clock)

    def start_lease(self, lease_time: timedelta, endpoint: str | None) -> Lease:
        """This replica's lease on leadership (`keyd serve`): lifecycle writes are
        refused while its clock is off, and fenced on its epoch."""
        self.lease = Lease(self.store, lease_time, clock=self.clock, endpoint=endpoint)
        return self.lease

    # ------------------------------------------------------------------ health

    def ready(self) -> dict[str, object]:
        """Readiness: backend reachable, store writable, an active key per purpose
        and each of them present in the backend; and who this replica is."""
        checks: dict[str, str] = {}
        try:
            self.backend.check()
            checks["backend"] = "ok"
        except KeydError as e:
            checks["backend"] = e.detail
        try:
            self.store.ping(write=True)
            checks["store"] = "ok"
        except KeydError as e:
            checks["store"] = e.detail
        try:
            self._loaded_at = float("-inf")
            self._refresh()
            missing = [p.value for p in self.settings.enabled_purposes() if p not in self._active]
            checks["active_keys"] = "ok" if not missing else f"missing: {', '.join(missing)}"
        except KeydError as e:
            checks["active_keys"] = e.detail
        if checks["backend"] == "ok":
            checks["active_keys_in_backend"] = self._active_keys_in_backend()
        if self.lease is not None:
            checks["clock"] = self.lease.clock_error or "ok"
        lease = self.lease.state() if self.lease is not None else None
        return {
            "ready": all(v == "ok" for v in checks.values()),
            "replica": lease.replica if lease is not None else this_replica(),
            "leader": lease.leader if lease is not None else False,
            "lease_expires_at": None if lease is None else lease.to_json()["lease_expires_at"],
            "epoch": None if lease is None else lease.epoch,
            "checks": checks,
        }

    def _active_keys_in_backend(self) -> str:
        """A key deleted from the backend behind keyd's back makes this replica
        not ready at once (the leader's recovery alerts and replaces it)."""
        lost = []
        for key in list(self._active.values()):
            try:
                self.backend.public_key(key.ref)
            except KeyNotFound:
                lost.append(f"{key.purpose.value} key {key.kid}")
            except KeydError as e:
                return e.detail
        return "ok" if not lost else f"missing from the backend: {', '.join(lost)}"

    def replicas(self, within: timedelta) -> list[dict[str, object]]:
        """The serving processes seen within ``within`` (newest first)."""
        with self.store.session("replicas read") as session:
            rows = queries.replicas_seen(session)
            now = self.store.now(session.connection())
        return [{"replica": r.replica, "leader": r.leader, "endpoint": r.endpoint,
                 "started_at": rfc3339(utc(r.started_at)),
                 "seen_seconds_ago": round((now - utc(r.seen_at)).total_seconds(), 1)}
                for r in rows if now - utc(r.seen_at) <= within]
