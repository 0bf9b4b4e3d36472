"""How the CLI writes times: RFC 3339 and the distance in the largest whole unit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyd.cli import _relative, _rfc3339, _when

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("delta", "text"), [
    (timedelta(days=12, hours=23), "in 12 d"),
    (timedelta(hours=5, minutes=59), "in 5 h"),
    (timedelta(minutes=3, seconds=30), "in 3 min"),
    (timedelta(seconds=20), "now"),
    (timedelta(days=-2, hours=-1), "2 d ago"),
])
def test_relative_uses_the_largest_whole_unit(delta: timedelta, text: str) -> None:
    assert _relative(NOW + delta, NOW) == text


def test_when_is_rfc3339_in_utc_then_relative() -> None:
    later = datetime(2027, 1, 1, 8, 0, 0, tzinfo=UTC) + timedelta(microseconds=5)
    assert _when(later, NOW) == "2027-01-01T08:00:00Z (in 31 d)"
    assert _when(None, NOW) == "-"
    assert _rfc3339(datetime(2027, 1, 1, 8, 0, 0)) == "2027-01-01T08:00:00Z"  # naive: UTC
