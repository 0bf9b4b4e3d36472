"""Admin operations against the real daemon and the real CLI: rotate and revoke
need the admin policy; revocation takes effect on the JWKS and the API at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.daemon import keyd, running

FAST = {"lifecycle.transport": {"enabled": False}}


@pytest.mark.slow  # a real daemon
def test_rotate_and_revoke_over_the_admin_api_need_the_admin_policy(tmp_path: Path) -> None:
    with running(tmp_path, FAST) as daemon:
        with daemon.client(daemon.service_token) as svc:
            assert svc.post("/v1/keys/signing/rotate", json={}).status_code == 403
            assert svc.post("/v1/keys/whatever/revoke", json={"reason": "x"}).status_code == 403
        with daemon.client(daemon.admin_token) as admin:
            rotated = admin.post("/v1/keys/signing/rotate", json={})
            assert rotated.status_code == 200, rotated.text
            new = rotated.json()["key"]
            assert new["state"] == "pending"
            again = admin.post("/v1/keys/signing/rotate", json={})
            assert again.status_code == 409
            assert admin.post("/v1/keys/nonsense/rotate", json={}).status_code == 400
            with daemon.public() as public:
                kids = {k["kid"] for k in public.get("/jwks").json()["keys"]}
            assert new["kid"] in kids  # pending keys are published ahead of use

            keys = admin.get("/v1/keys").json()["keys"]
            active = next(k for k in keys if k["purpose"] == "signing" and k["state"] == "active")
            revoked = admin.post(f"/v1/keys/{active['kid']}/revoke", json={"reason": "leaked"})
            assert revoked.status_code == 200, revoked.text
            assert revoked.json()["key"]["state"] == "revoked"
            assert revoked.json()["replacement"]["kid"] == new["kid"]  # the pending key
            # An action call takes an empty body (the reason then names the caller);
            # a reason that is not a string is still refused.
            assert admin.post(f"/v1/keys/{active['kid']}/revoke",
                              json={"reason": 7}).status_code == 400
        with daemon.public() as public:
            kids = {k["kid"] for k in public.get("/jwks").json()["keys"]}
        assert active["kid"] not in kids
        with daemon.client(daemon.service_token) as svc:
            signed = svc.post("/v1/sign/jwt", json={"claims": {"a": 1}, "ttl": 60})
            assert signed.status_code == 200
            assert signed.json()["kid"] == new["kid"]


def test_cli_rotate_now_and_revoke_and_status_json(tmp_path: Path) -> None:
    from tests.daemon import write_config

    cfg = write_config(tmp_path, FAST)
    keyd(cfg, "init")
    out = keyd(cfg, "rotate", "encryption", "--now").stdout
    assert "is active" in out
    listed = json.loads(keyd(cfg, "keys", "list", "--json").stdout)
    enc = [k for k in listed if k["purpose"] == "encryption"]
    assert sorted(k["state"] for k in enc) == ["active", "retired"]
    active = next(k for k in enc if k["state"] == "active")
    result = keyd(cfg, "revoke", active["kid"], "--reason", "test")
    assert "revoked encryption key" in result.stdout and "is active" in result.stdout
    missing = keyd(cfg, "revoke", "no-such-kid", "--reason", "x", check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    status = json.loads(keyd(cfg, "status", "--json").stdout)
    assert [s["state"] for s in status if s["purpose"] == "encryption"].count("active") == 1
    assert all(s["days_left"] is not None for s in status)
    audit = json.loads(keyd(cfg, "audit", "--json", "--limit", "100").stdout)
    actions = {event["action"] for event in audit}
    assert {"key.rotate", "key.activate", "key.retire", "key.revoke"} <= actions
