"""Abuse limits on the local API: one flooding client is slowed, others are not."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import keyd, running


def test_a_flooding_client_gets_429_while_another_keeps_signing(tmp_path: Path) -> None:
    with running(tmp_path, {"api": {"rate_limit": 1, "rate_burst": 5}}) as daemon:
        other = keyd(daemon.config, "client", "add", "svc-2", "--policy", "service").stdout.strip()
        with daemon.client(daemon.service_token) as flooder, daemon.client(other) as polite:
            flood = [flooder.post("/v1/sign/jws", json={"payload": i}) for i in range(30)]
            calm = [polite.post("/v1/sign/jws", json={"payload": i}) for i in range(4)]
        limited = [r for r in flood if r.status_code == 429]
        assert len(limited) >= 20
        assert all(r.json()["error"] == "rate_limited" for r in limited)
        assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert [r.status_code for r in flood[:5]] == [200] * 5
        assert [r.status_code for r in calm] == [200] * 4
        assert daemon.healthy()
