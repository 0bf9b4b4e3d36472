"""Several real `keyd serve` on one PostgreSQL store and one OpenBao: one leader
seen in /readyz and `keyd status`, a killed leader replaced within the lease,
and a duplicate daemon on one data_dir refused before it touches anything."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyd import config as keyd_config
from keyd.model import Purpose
from keyd.service import KeyService
from tests.fixtures.daemon import KEYD, Daemon, keyd, start, until, write_config
from tests.fixtures.openbao import BaoServer
from tests.fixtures.transit import least_privilege_transit, vault_tables

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.slow]

LEASE = 2.0


def readyz(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as anonymous:
        answer: dict[str, Any] = anonymous.get("/readyz").json()
    return answer




@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str, openbao: BaoServer) -> Iterator[list[Daemon]]:
    """Two replicas: one store, one transit mount, a data_dir and config each."""
    transit = least_privilege_transit(openbao)
    configs = []
    for name in ("r1", "r2"):
        folder = tmp_path / name
        folder.mkdir()
        tables = vault_tables(folder, openbao.addr, transit, transport=False)
        tables["store"] = {"url": postgres_url}
        tables["scheduler"] = {"lease": f"{LEASE:.0f}s", "interval": "1s"}
        configs.append(write_config(folder, tables))
    keyd(configs[0], "init")
    admin = keyd(configs[0], "client", "add", "admin-1", "--policy", "admin").stdout.strip()
    daemons = [start(c, admin_token=admin) for c in configs]
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def test_one_replica_leads_and_a_killed_leader_is_replaced_within_the_lease(
        replicas: list[Daemon]) -> None:
    until(lambda: sum(readyz(d)["leader"] for d in replicas) == 1, "exactly one leader")
    states = [readyz(d) for d in replicas]
    assert all(s["ready"] for s in states), states
    assert len({s["replica"] for s in states}) == 2
    leader = next(d for d, s in zip(replicas, states, strict=True) if s["leader"])
    follower = next(d for d in replicas if d is not leader)
    assert next(s for s in states if s["leader"])["lease_expires_at"] is not None
    status = keyd(follower.config, "status").stdout
    assert status.count(":") >= 2 and "leader" in status and "follower" in status
    epoch = readyz(leader)["epoch"]

    leader.stop(signal.SIGKILL)
    until(lambda: readyz(follower)["leader"], "the follower takes over")
    assert readyz(follower)["epoch"] == epoch + 1
    # The new leader serves and signs as before.
    with httpx.Client(base_url=follower.public_url) as public:
        assert public.get("/jwks").status_code == 200


def test_a_second_daemon_on_one_data_dir_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, {"lifecycle.transport": {"enabled": False}})
    keyd(config, "init")
    first = start(config)
    try:
        before = keyd(config, "keys", "list", "--json").stdout
        second = subprocess.run([*KEYD, "--config", str(config), "serve"], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and "is in use by keyd pid" in second.stderr
        assert first.socket.is_socket()  # the live socket was not unlinked
        assert first.healthy()
        assert keyd(config, "keys", "list", "--json").stdout == before
        audit = keyd(config, "audit", "--json", "--limit", "500").stdout
        assert '"action": "key.create"' in audit  # the listing works ...
        assert "key.erase" not in audit and "key.intent.erase" not in audit  # ... and has none
    finally:
        first.stop()


def test_a_live_unix_socket_is_never_unlinked_by_another_daemon(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = write_config(tmp_path / "a", {"lifecycle.transport": {"enabled": False}})
    keyd(config, "init")
    first = start(config)
    try:
        other = tmp_path / "b"
        other.mkdir()
        clash = write_config(other, {"lifecycle.transport": {"enabled": False},
                                     "api": {"socket": str(first.socket)}})
        keyd(clash, "init")
        second = subprocess.run([*KEYD, "--config", str(clash), "serve"], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1 and second.stderr.count("\n") == 1
        assert "in use by a running process; not removed" in second.stderr
        with first.socket_client(first.admin_token or "none") as client:
            assert client.get("/healthz").status_code == 200
    finally:
        first.stop()


def test_a_replica_whose_backend_differs_from_the_store_s_refuses_to_start(
        tmp_path: Path, postgres_url: str) -> None:
    """The local backend with its own data_dir joining a shared store: refused with
    one line naming both, instead of revoking every key it cannot find."""
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(write_config(tmp_path / name, {
            "lifecycle.transport": {"enabled": False}, "store": {"url": postgres_url}}))
    keyd(configs[0], "init")
    before = keyd(configs[0], "keys", "list", "--json").stdout
    refused = keyd(configs[1], "init", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 2, refused.stderr
    line = refused.stderr.splitlines()[-1]  # after "created master key …"
    assert "holds the keys of local master key" in line
    assert "this replica's backend is local master key" in line
    assert keyd(configs[0], "keys", "list", "--json").stdout == before


def test_every_file_keyd_writes_is_0600(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"lifecycle.transport": {"enabled": False}})
    keyd(config, "init")
    daemon = start(config)
    try:
        data_dir = tmp_path / "var"
        files = [p for p in data_dir.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"keyd.db", "master.key", "serve.lock", "keyd.db.leader",
                "endpoints.json"} <= names, names
        for path in files:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {path.stat().st_mode:o}"
    finally:
        daemon.stop()


def test_a_key_deleted_from_the_backend_is_not_ready_then_replaced_by_the_leader(
        tmp_path: Path, openbao: BaoServer) -> None:
    transit = least_privilege_transit(openbao)
    tables = vault_tables(tmp_path, openbao.addr, transit, transport=False)
    tables["scheduler"] = {"interval": "1h", "lease": "2s"}
    config = write_config(tmp_path, tables)
    keyd(config, "init")
    token = keyd(config, "client", "add", "svc", "--policy", "service").stdout.strip()
    service = KeyService.open(keyd_config.load(config))
    try:
        lost = service.active_key(Purpose.SIGNING)
    finally:
        service.close()
    daemon = start(config)
    try:
        with daemon.client(token) as svc:
            assert svc.post("/v1/sign/jwt", json={"claims": {}, "ttl": 60}).status_code == 200
            # Deleted behind keyd's back, by an operator with the root token.
            root = openbao.client().secrets.transit
            root.update_key_configuration(lost.ref, deletion_allowed=True,
                                          mount_point=transit.mount)
            root.delete_key(lost.ref, mount_point=transit.mount)
            answer = svc.post("/v1/sign/jwt", json={"claims": {}, "ttl": 60})
            assert answer.status_code == 503, answer.text  # never a silent 404
            assert int(answer.headers["Retry-After"]) > 0  # like every other 503
            ready = readyz(daemon)
            assert ready["ready"] is False
            assert lost.kid in ready["checks"]["active_keys_in_backend"]
        daemon.stop()
        daemon = start(config)  # the leader's recovery (start-up, or its next tick)
        with daemon.client(token) as svc:
            answer = svc.post("/v1/sign/jwt", json={"claims": {}, "ttl": 60})
            assert answer.status_code == 200 and answer.json()["kid"] != lost.kid
        assert readyz(daemon)["ready"] is True
        assert "lost from the backend" in (tmp_path / "keyd.log").read_text()  # the alert
        states = {k["kid"]: k["state"] for k in
                  json.loads(keyd(config, "keys", "list", "--json").stdout)}
        assert states[lost.kid] == "revoked"
    finally:
        daemon.stop()
