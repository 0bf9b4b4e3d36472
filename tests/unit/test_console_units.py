"""The console's pure parts: session expiry under a settable clock, countdown
text, the timeline's geometry, autoescaping."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyd.clock import SettableClock
from keyd.console import timeline
from keyd.console.render import duration, environment, relative
from keyd.console.views import KeyRow, shape_readiness
from keyd.console.web import same_secret
from keyd.model import KeyState, Purpose
from keyd.store.sessions import (
    ABSOLUTE,
    IDLE,
    MAX_SESSIONS,
    SessionStore,
    _digest,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_a_session_ends_after_the_idle_time_without_a_request(tmp_path: Path) -> None:
    clock = SettableClock(T0)
    store = SessionStore(clock, tmp_path / "s.db")
    cookie, _ = store.create("admin-1")
    clock.advance(IDLE - timedelta(seconds=1))
    assert store.get(cookie) is not None  # ... which restarts the idle timer
    clock.advance(IDLE - timedelta(seconds=1))
    assert store.get(cookie) is not None
    clock.advance(IDLE)
    assert store.get(cookie) is None
    assert store.get(cookie) is None  # and it stays ended


def test_a_busy_session_still_ends_at_the_absolute_limit(tmp_path: Path) -> None:
    clock = SettableClock(T0)
    store = SessionStore(clock, tmp_path / "s.db")
    cookie, _ = store.create("admin-1")
    while clock.now() - T0 < ABSOLUTE - IDLE:
        clock.advance(IDLE / 2)
        assert store.get(cookie) is not None
    clock.set(T0 + ABSOLUTE)
    assert store.get(cookie) is None


def test_a_clock_that_goes_back_does_not_revive_or_extend_a_session(tmp_path: Path) -> None:
    clock = SettableClock(T0)
    store = SessionStore(clock, tmp_path / "s.db")
    cookie, _ = store.create("admin-1")
    clock.advance(ABSOLUTE)
    assert store.get(cookie) is None
    clock.set(T0)
    assert store.get(cookie) is None


def test_sign_out_and_client_revocation_end_sessions_and_the_file_keeps_no_cookie(
        tmp_path: Path) -> None:
    store = SessionStore(SettableClock(T0), tmp_path / "s.db")
    a, _ = store.create("admin-1")
    b, _ = store.create("admin-2")
    c, _ = store.create("admin-2")
    # Only the cookie's hash is kept: not in the table, not anywhere in the files.
    with sqlite3.connect(store.path) as db:
        rows = db.execute("SELECT * FROM sessions").fetchall()
    assert len(rows) == 3 and _digest(a) in repr(rows)
    assert not any(cookie in repr(rows) for cookie in (a, b, c))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert not any(cookie.encode() in stored for cookie in (a, b, c))
    assert store.path.stat().st_mode & 0o777 == 0o600
    store.end(a)
    assert store.get(a) is None
    store.end_client("admin-2")
    assert store.get(b) is None and store.get(c) is None
    assert store.get("x" * 500) is None and store.get(None) is None


def test_the_number_of_sessions_is_bounded(tmp_path: Path) -> None:
    store = SessionStore(SettableClock(T0), tmp_path / "s.db")
    for _ in range(MAX_SESSIONS + 5):
        store.create("admin-1")
    assert len(store) == MAX_SESSIONS


def test_csrf_tokens_compare_exactly(tmp_path: Path) -> None:
    store = SessionStore(SettableClock(T0), tmp_path / "s.db")
    _, session = store.create("admin-1")
    assert same_secret(session.csrf, session.csrf)
    assert not same_secret(None, session.csrf)
    assert not same_secret("", session.csrf)
    assert not same_secret(session.csrf[:-1], session.csrf)
    _, other = store.create("admin-1")
    assert other.csrf != session.csrf


_OTHER_PROCESS = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from keyd.clock import SettableClock
from keyd.store.sessions import SessionStore
store = SessionStore(SettableClock(datetime(2026, 11, 30, 12, 1, tzinfo=UTC)), Path(sys.argv[1]))
session = store.get(sys.argv[2])
assert session is not None and session.client == "admin-1"
print("|".join(session.take_flashes()))
session.flash("from the other process")
"""


@pytest.mark.slow  # a second Python process
def test_sessions_and_flashes_are_shared_by_every_process_on_the_file(tmp_path: Path) -> None:
    """[api] workers: the next request may reach another process than the one that
    signed the browser in."""
    clock = SettableClock(T0)
    one = SessionStore(clock, tmp_path / "s.db")
    two = SessionStore(clock, tmp_path / "s.db")
    cookie, session = one.create("admin-1")
    session.flash("Signed in as admin-1.")
    found = two.get(cookie)
    assert found is not None and (found.client, found.csrf) == ("admin-1", session.csrf)
    assert found.take_flashes() == ["Signed in as admin-1."]
    assert found.take_flashes() == [] and session.take_flashes() == []  # taken exactly once

    # Another process (the workers are forked): it sees the session, takes its flash and
    # leaves one for us.
    session.flash("first")
    session.flash("second")
    done = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(one.path), cookie],
                          capture_output=True, text=True, env=os.environ, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "first|second"
    again = one.get(cookie)
    assert again is not None and again.take_flashes() == ["from the other process"]
    seen_by_two = two.get(cookie)
    assert seen_by_two is not None and seen_by_two.take_flashes() == []

    # Sign-out through one ends it for the other; so does revoking the client.
    two.end(cookie)
    assert one.get(cookie) is None and two.get(cookie) is None
    other, _ = two.create("admin-2")
    one.end_client("admin-2")
    assert two.get(other) is None
    # And the expiry is the same everywhere: idle seen by one, refused by the other.
    late, _ = one.create("admin-1")
    clock.advance(IDLE)
    assert two.get(late) is None


def test_countdowns_read_at_a_glance() -> None:
    assert relative(T0 + timedelta(days=396, hours=23, minutes=5), T0) == "in 396 d 23 h"
    assert relative(T0 + timedelta(hours=2, minutes=5), T0) == "in 2 h 5 min"
    assert relative(T0 - timedelta(minutes=7, seconds=3), T0) == "7 min ago"
    assert relative(T0 + timedelta(seconds=9), T0) == "in 9 s"
    assert relative(None, T0) == ""
    assert [duration(timedelta(minutes=15)), duration(timedelta(days=2)),
            duration(timedelta(hours=36)), duration(timedelta(seconds=90))] == [
        "15m", "2d", "36h", "90s"]


def key(kid: str, state: KeyState, **fields: Any) -> KeyRow:
    """A KeyRow with ``fields`` (its times, ``changed`` for state_changed_at, a reason)."""
    return KeyRow(id="kv_" + kid, kid=kid, purpose=Purpose.SIGNING,
                  state=state, alg="PS256", key_size=2048, backend="local",
                  created_at=fields.get("publish_at", T0 - timedelta(days=100)),
                  state_changed_at=fields.pop("changed", T0 - timedelta(days=1)), **fields)


def test_the_timeline_draws_each_stretch_of_each_key_in_time_order() -> None:
    d = timedelta(days=1)
    keys = [
        key("old", KeyState.RETIRED, publish_at=T0 - 95 * d, activated_at=T0 - 93 * d,
            retired_at=T0 - 3 * d, destroy_after=T0 + 4 * d, not_after=T0 + 300 * d),
        key("cur", KeyState.ACTIVE, publish_at=T0 - 5 * d, activated_at=T0 - 3 * d,
            rotates_at=T0 + 87 * d, not_after=T0 + 392 * d),
        key("next", KeyState.PENDING, publish_at=T0 - d, activates_at=T0 + d,
            not_after=T0 + 396 * d),
        key("bad", KeyState.REVOKED, publish_at=T0 - 10 * d, changed=T0 - 2 * d,
            revoked_reason="leaked"),
    ]
    thresholds = (timedelta(days=30), timedelta(days=7))
    drawn = timeline.build(keys, T0, thresholds)
    assert [r.kid for r in drawn.rows] == ["old", "cur", "next", "bad"]
    kinds = {(s.label.split(":")[0].split()[-1], s.kind) for s in drawn.spans}
    assert {("old", "published"), ("old", "active"), ("old", "retired"), ("cur", "published"),
            ("cur", "active"), ("cur", "planned"), ("next", "published"),
            ("bad", "published")} == kinds
    old = {s.kind: s for s in drawn.spans if "key old:" in s.label}
    assert old["published"].x < old["active"].x < old["retired"].x  # left to right in time
    assert old["active"].x + old["active"].width <= drawn.now_x <= old["retired"].x + \
        old["retired"].width
    assert drawn.plot_left < drawn.now_x < drawn.plot_left + drawn.plot_width
    marks = [(m.kind, m.label.split(":")[0].split()[-1]) for m in drawn.marks]
    assert ("revoked", "bad") in marks
    # Expiry thresholds only for keys that will still be in use: active and pending.
    assert marks.count(("threshold", "cur")) == 2 and marks.count(("threshold", "next")) == 2
    assert ("threshold", "old") not in marks
    assert any("leaked" in m.label for m in drawn.marks if m.kind == "revoked")
    assert drawn.start <= T0 - 95 * d and drawn.end >= T0 + 396 * d  # the whole picture


def test_a_fixed_window_clips_spans_to_its_edges() -> None:
    d = timedelta(days=1)
    keys = [key("cur", KeyState.ACTIVE, publish_at=T0 - 200 * d, activated_at=T0 - 90 * d,
                rotates_at=T0 + 300 * d, not_after=T0 + 300 * d)]
    drawn = timeline.build(keys, T0, (), days=30)
    assert drawn.end - drawn.start == 30 * d
    for span in drawn.spans:
        assert drawn.plot_left <= span.x <= span.x + span.width <= (
            drawn.plot_left + drawn.plot_width + 0.1)
    assert not [m for m in drawn.marks if m.kind == "not_after"]  # beyond the window
    assert len(drawn.ticks) >= 4 and all(t.label for t in drawn.ticks)  # weekly, labelled


def test_templates_escape_every_value() -> None:
    template = environment().from_string("<p>{{ value }}</p>")
    assert template.render(value="<b>x</b>&") == "<p>&lt;b&gt;x&lt;/b&gt;&amp;</p>"


def test_readiness_shows_what_readyz_gives_today_and_the_leader_once_reported() -> None:
    today = shape_readiness({"backend": "ok", "active_keys": "ok", "store": "ok",
                             "ready": True})
    assert today == {"ready": True, "leader": None, "replica": None,
                     "checks": {"backend": "ok", "active_keys": "ok", "store": "ok"}}
    replicated = shape_readiness({"ready": False, "replica": "host-b", "leader": False,
                                  "checks": {"backend": "sealed"}})
    assert replicated == {"ready": False, "leader": False, "replica": "host-b",
                          "checks": {"backend": "sealed"}}
