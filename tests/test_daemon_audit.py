"""The audit log around the running daemon: every sign is recorded, a write
that cannot be recorded does not happen, and an edited row is named."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from joserfc import jwe
from joserfc.jwk import KeySet

from tests.daemon import keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module


@contextmanager
def database_locked(db: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock for the duration."""
    blocker = sqlite3.connect(db, timeout=1, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_sign_fails_closed_with_503_while_the_audit_log_cannot_be_written(
    tmp_path: Path,
) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc:
        assert svc.post("/v1/sign/jws", json={"payload": "before"}).status_code == 200
        with database_locked(tmp_path / "var" / "keyd.db"):
            locked = svc.post("/v1/sign/jws", json={"payload": "while locked"})
        assert locked.status_code == 503, locked.text
        assert locked.json()["error"] == "store_unavailable"
        assert "jws" not in locked.json()
        assert int(locked.headers["retry-after"]) >= 1
        after = svc.post("/v1/sign/jws", json={"payload": "after"})
        assert after.status_code == 200
        assert daemon.healthy()
    signed = json.loads(keyd(daemon.config, "audit", "--action", "sign.jws", "--json").stdout)
    assert len(signed) == 2  # the refused sign left no record, because it did not happen


def test_editing_one_audit_row_makes_audit_verify_fail_and_name_it(tmp_path: Path) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc:
        for i in range(3):
            assert svc.post("/v1/sign/jws", json={"payload": i}).status_code == 200
    assert keyd(daemon.config, "audit", "verify").returncode == 0
    db = sqlite3.connect(tmp_path / "var" / "keyd.db")
    with db:
        segment, seq = db.execute(
            "SELECT segment, seq FROM audit_events WHERE action = 'sign.jws' "
            "ORDER BY seq LIMIT 1 OFFSET 1").fetchone()
        db.execute("UPDATE audit_events SET actor = 'someone-else' "
                   "WHERE segment = ? AND seq = ?", (segment, seq))
    db.close()
    result = keyd(daemon.config, "audit", "verify", check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"keyd: error: audit chain broken at event {seq} of segment {segment}\n")


def test_decrypt_and_rotation_fail_closed_while_the_store_is_locked(tmp_path: Path) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc, \
            daemon.client(daemon.admin_token) as admin:
        with daemon.public() as public:
            keys = KeySet.import_key_set(public.get("/jwks").json())
        enc = next(k for k in keys.keys if k.get("use") == "enc")
        token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": enc.kid},
                                    b"secret", enc, algorithms=["RSA-OAEP-256", "A256GCM"])
        before = admin.get("/v1/keys").json()["keys"]
        key_files = sorted((tmp_path / "var" / "keys").iterdir())
        with database_locked(tmp_path / "var" / "keyd.db"):
            decrypt = svc.post("/v1/decrypt/jwe", json={"jwe": token})
            rotate = admin.post("/v1/keys/signing/rotate", json={})
        assert decrypt.status_code == 503 and "plaintext_b64" not in decrypt.json()
        assert rotate.status_code == 503, rotate.text
        # The rotation aborted cleanly: no half-made key, the same keys as before.
        assert admin.get("/v1/keys").json()["keys"] == before
        assert sorted((tmp_path / "var" / "keys").iterdir()) == key_files  # no orphan key
        assert svc.post("/v1/decrypt/jwe", json={"jwe": token}).status_code == 200
        assert daemon.healthy()
    result = keyd(daemon.config, "audit", "verify")
    assert "intact" in result.stdout
