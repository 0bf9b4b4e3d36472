"""The audit log around the running daemon: every sign is recorded, a write
that cannot be recorded does not happen, and an edited row is named."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.daemon import keyd, running


def test_sign_fails_closed_with_503_while_the_audit_log_cannot_be_written(
    tmp_path: Path,
) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc:
        assert svc.post("/v1/sign/jws", json={"payload": "before"}).status_code == 200
        blocker = sqlite3.connect(tmp_path / "var" / "keyd.db", timeout=1, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            locked = svc.post("/v1/sign/jws", json={"payload": "while locked"})
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert locked.status_code == 503, locked.text
        assert locked.json()["error"] == "store_unavailable"
        assert "jws" not in locked.json()
        assert int(locked.headers["retry-after"]) >= 1
        after = svc.post("/v1/sign/jws", json={"payload": "after"})
        assert after.status_code == 200
        assert daemon.healthy()
    signed = [json.loads(line) for line in
              keyd(daemon.config, "audit", "--action", "sign.jws", "--json").stdout.splitlines()]
    assert len(signed) == 2  # the refused sign left no record, because it did not happen


def test_editing_one_audit_row_makes_audit_verify_fail_and_name_it(tmp_path: Path) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc:
        for i in range(3):
            assert svc.post("/v1/sign/jws", json={"payload": i}).status_code == 200
    assert keyd(daemon.config, "audit", "verify").returncode == 0
    db = sqlite3.connect(tmp_path / "var" / "keyd.db")
    with db:
        seq = db.execute("SELECT seq FROM audit_events WHERE action = 'sign.jws' "
                         "ORDER BY seq LIMIT 1 OFFSET 1").fetchone()[0]
        db.execute("UPDATE audit_events SET actor = 'someone-else' WHERE seq = ?", (seq,))
    db.close()
    result = keyd(daemon.config, "audit", "verify", check=False)
    assert result.returncode == 1
    assert result.stderr == f"keyd: error: audit chain broken at event {seq}\n"
