"""Prometheus metrics, on a registry of keyd's own (tests run many daemons)."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from keyd.model import KeyState, Purpose


class LifecycleCounts(Collector):
    """Rotations and alerts, exposed by every Metrics registry of this process.

    Rotations are read from the store at each scrape (``observe_rotations``):
    a rotation made by the CLI, the admin API, the scheduler or another
    replica is counted alike, and every process reports the same number.
    Alerts are counted where they are sent (the leader's jobs).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rotations: dict[str, int] = {}  # purpose -> rotations completed (from the store)
        self.alerts: Tally[tuple[str, str]] = Tally()  # (purpose or "-", kind) -> sent

    def set_rotations(self, counts: dict[Purpose, int]) -> None:
        with self._lock:
            self.rotations = {p.value: n for p, n in counts.items()}

    def alerted(self, purpose: str, kind: str) -> None:
        with self._lock:
            self.alerts[(purpose, kind)] += 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            rotations, alerts = dict(self.rotations), dict(self.alerts)
        r = CounterMetricFamily("keyd_rotations", "Key rotations completed, by purpose",
                                labels=["purpose"])
        for purpose in Purpose:
            r.add_metric([purpose.value], rotations.get(purpose.value, 0))
        yield r
        a = CounterMetricFamily("keyd_alerts", "Alerts sent, by purpose and kind",
                                labels=["purpose", "kind"])
        for (subject, kind), n in sorted(alerts.items()):
            a.add_metric([subject, kind], n)
        yield a


LIFECYCLE = LifecycleCounts()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LIFECYCLE)
        self.requests = Counter(
            "keyd_api_requests", "Local API calls by operation and outcome",
            ["operation", "outcome"], registry=self.registry,
        )
        self.latency = Histogram(
            "keyd_api_request_seconds", "Local API call latency by operation", ["operation"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.key_states = Gauge(
            "keyd_keys", "Key versions by purpose and state", ["purpose", "state"],
            registry=self.registry,
        )
        self.not_after = Gauge(
            "keyd_certificate_not_after_timestamp_seconds",
            "Expiry of the certificate of each published or awaiting key", ["purpose", "kid"],
            registry=self.registry,
        )

    def observe_keys(self, keys: list[tuple[Purpose, KeyState, str, float | None]]) -> None:
        """Refresh the key gauges from (purpose, state, kid, not_after epoch)."""
        counts = {(p, s): 0 for p in Purpose for s in KeyState}
        self.not_after.clear()
        for purpose, state, kid, not_after in keys:
            counts[(purpose, state)] += 1
            if not_after is not None and state not in (KeyState.DESTROYED, KeyState.REVOKED):
                self.not_after.labels(purpose.value, kid).set(not_after)
        for (purpose, state), n in counts.items():
            self.key_states.labels(purpose.value, state.value).set(n)

    def observe_rotations(self, counts: dict[Purpose, int]) -> None:
        """Refresh keyd_rotations_total from the store's count (KeyService.rotation_counts)."""
        LIFECYCLE.set_rotations(counts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
