"""The same daemon on PostgreSQL: `[store] url = "postgresql+psycopg://…"`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.daemon import keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module


@pytest.mark.postgres
def test_daemon_on_postgresql_initialises_signs_and_audits(
    tmp_path: Path, postgres_url: str
) -> None:
    with running(tmp_path, {"store": {"url": postgres_url}}) as daemon:
        with daemon.client(daemon.service_token) as svc:
            answer = svc.post("/v1/client-assertion", json={"audience": "https://as.example/t"})
        assert answer.status_code == 200, answer.text
        with daemon.public() as public:
            keys = KeySet.import_key_set(public.get("/jwks").json())
        claims = jwt.decode(answer.json()["client_assertion"], keys, algorithms=["PS256"]).claims
        assert claims["iss"] == "test-client-0001"
    assert not (tmp_path / "var" / "keyd.db").exists()  # nothing went to SQLite
    listed = json.loads(keyd(daemon.config, "keys", "list", "--json").stdout)
    assert {k["purpose"] for k in listed if k["state"] == "active"} == {
        "signing", "encryption", "transport"}
    assert "intact" in keyd(daemon.config, "audit", "verify").stdout
    actions = keyd(daemon.config, "audit", "--action", "sign.client_assertion", "--json").stdout
    assert json.loads(actions)[0]["actor"] == "svc-1"
