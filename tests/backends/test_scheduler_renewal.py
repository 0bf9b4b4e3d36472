"""The scheduler keeps a Vault login alive: it renews the backend's token,
and an AppRole whose token was revoked logs in again on the next renewal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keyd import config
from keyd.backends.vault import VaultBackend
from keyd.jobs import Jobs
from keyd.scheduler import Scheduler
from keyd.service import KeyService
from tests.fixtures.daemon import keyd, write_config
from tests.fixtures.openbao import BaoServer

pytestmark = pytest.mark.vault


def test_scheduler_renews_an_approle_login_and_logs_in_again_after_revocation(
    tmp_path: Path, openbao: BaoServer, transit_mount: str, approle: dict[str, Any]
) -> None:
    path = write_config(tmp_path, {
        "backend": {"kind": "vault"},
        "backend.vault": {"addr": openbao.addr, "mount": transit_mount, "auth": "approle",
                          "role_id": approle["role_id"],
                          "secret_id_file": str(approle["secret_id_file"]),
                          "approle_mount": approle["path"]},
        "lifecycle.transport": {"enabled": False},
    })
    service = KeyService.open(config.load(path))
    scheduler = Scheduler(Jobs(service))
    try:
        assert scheduler.job_ids() == ["lifecycle", "renew"]
        service.init()
        backend = service.backend
        assert isinstance(backend, VaultBackend)
        first_token = backend._client.token
        scheduler.renew()
        assert backend._client.token == first_token
        openbao.client().sys.revoke_prefix(f"auth/{approle['path']}/login")
        scheduler.renew()  # renewal of a revoked token fails: log in afresh
        assert backend._client.token != first_token
        backend.check()
        assert service.keys()
    finally:
        scheduler.stop()
        service.close()


def test_the_local_backend_has_nothing_to_renew(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    keyd(path, "init")
    service = KeyService.open(config.load(path))
    try:
        assert Scheduler(Jobs(service)).job_ids() == ["lifecycle"]
    finally:
        service.close()
