"""THREATS "audit truncation": the newest audit rows deleted leave a shorter
chain that still links up; only a head recorded outside the store (a logged
checkpoint, an alert, `keyd audit head` kept by an admin) detects the cut."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from keyd.audit import GENESIS, AuditEvent, AuditLog, parse_head
from keyd.clock import SettableClock
from keyd.store.db import Store
from tests.daemon import keyd, running


@pytest.fixture
def log(store: Store) -> Iterator[AuditLog]:
    audit = AuditLog(store, SettableClock(datetime(2025, 3, 1, tzinfo=UTC)))
    try:
        yield audit
    finally:
        audit.close()


def record(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(AuditEvent(actor="svc", action="sign.jws", detail={"n": i}))


def test_the_head_of_an_empty_chain_is_genesis(log: AuditLog) -> None:
    assert log.head() == (0, GENESIS)
    assert log.reaches(0, GENESIS) is None


def test_audit_truncation_is_detected_against_an_earlier_head(
    log: AuditLog, store: Store
) -> None:
    record(log, 5)
    length, digest = log.head()
    assert length == 5 and log.reaches(length, digest) is None
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 3"))
    assert log.verify() is None  # what is left still links up
    why = log.reaches(length, digest)
    assert why is not None and "cut off" in why and "3 events" in why


def test_audit_truncation_and_regrowth_is_detected_as_a_rewrite(
    log: AuditLog, store: Store
) -> None:
    """Cut back, then new events appended to the same length: a different head."""
    record(log, 4)
    anchor = log.head()
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 2"))
    record(log, 2)
    assert log.head()[0] == anchor[0] and log.verify() is None
    why = log.reaches(*anchor)
    assert why is not None and "rewritten" in why


def test_a_longer_chain_still_reaches_an_earlier_head(log: AuditLog) -> None:
    record(log, 3)
    anchor = log.head()
    record(log, 3)
    assert log.reaches(*anchor) is None


@pytest.mark.parametrize("text_", ["", "5", "5:abc", "-1:" + "0" * 64, "05:" + "0" * 64,
                                   "5:" + "G" * 64, "5:" + "0" * 65])
def test_a_malformed_head_is_refused(text_: str) -> None:
    with pytest.raises(ValueError):
        parse_head(text_)

@pytest.mark.slow  # a real daemon
def test_audit_truncation_the_daemon_logs_a_checkpoint_and_verify_expect_uses_it(
    tmp_path: Path,
) -> None:
    with running(tmp_path) as daemon, daemon.client(daemon.service_token) as svc:
        for i in range(3):
            assert svc.post("/v1/sign/jws", json={"payload": i}).status_code == 200
    logged = re.findall(r"audit checkpoint (\d+:[0-9a-f]{64})",
                        (tmp_path / "keyd.log").read_text())
    assert logged, "keyd serve logged no audit checkpoint"
    head = keyd(daemon.config, "audit", "head").stdout.strip()
    length, _ = parse_head(head)
    assert length >= 3
    for anchor in (logged[-1], head):
        ok = keyd(daemon.config, "audit", "verify", "--expect", anchor)
        assert ok.stdout.startswith("audit chain intact")

    db = sqlite3.connect(tmp_path / "var" / "keyd.db")
    with db:
        # The daemon's segment (its sign events) loses its last two events.
        segment, last = db.execute(
            "SELECT segment, max(seq) FROM audit_events WHERE segment IN "
            "(SELECT segment FROM audit_events WHERE action = 'sign.jws') "
            "GROUP BY segment").fetchone()
        assert last >= 3
        db.execute("DELETE FROM audit_events WHERE segment = ? AND seq > ?",
                   (segment, last - 2))
    db.close()
    assert keyd(daemon.config, "audit", "verify").returncode == 0  # the cut is invisible
    cut = keyd(daemon.config, "audit", "verify", "--expect", head, check=False)
    assert cut.returncode == 1
    assert cut.stderr.startswith(f"keyd: error: audit chain does not reach {head}")
    assert "cut off" in cut.stderr and cut.stderr.count("\n") == 1
    bad = keyd(daemon.config, "audit", "verify", "--expect", "nonsense", check=False)
    assert bad.returncode == 1 and "LENGTH:HASH" in bad.stderr
