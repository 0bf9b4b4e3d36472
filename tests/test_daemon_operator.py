"""What an operator reads from a running daemon after CLI and admin-API work:
a pending key's activation time in GET /v1/keys, and keyd_rotations_total
counting rotations wherever they were made (it is derived from the store)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.daemon import Daemon, keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module


def rotations(daemon: Daemon) -> dict[str, float]:
    with daemon.client() as client:
        text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^keyd_rotations_total\{purpose="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_pending_key_activation_and_rotations_from_cli_and_admin_api(tmp_path: Path) -> None:
    with running(tmp_path) as daemon:
        assert rotations(daemon) == {"signing": 0, "encryption": 0, "transport": 0}

        keyd(daemon.config, "rotate", "signing")  # pending: published, not yet signing
        with daemon.client(daemon.admin_token) as admin:
            listed = admin.get("/v1/keys").json()["keys"]
        pending = next(k for k in listed if k["state"] == "pending")
        assert pending["purpose"] == "signing" and pending["activates_at"].endswith("Z")
        assert all("activates_at" not in k for k in listed if k["state"] != "pending")

        keyd(daemon.config, "rotate", "encryption", "--now")  # in the CLI's own process
        with daemon.client(daemon.admin_token) as admin:
            answer = admin.post("/v1/keys/transport/rotate", json={"now": True})
        assert answer.status_code == 200, answer.text
        # The pending signing key is not a rotation until it activates.
        assert rotations(daemon) == {"signing": 0, "encryption": 1, "transport": 1}
