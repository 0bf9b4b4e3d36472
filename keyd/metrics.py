"""Prometheus metrics, on a registry of keyd's own (tests run many daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from keyd.model import KeyState, Purpose


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
