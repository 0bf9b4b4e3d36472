"""The timeline's geometry, computed on the server: one row per key version.

Pure: key rows, the time and the window in, shapes out; the template turns
them into SVG.  Each span knows its own label, which the SVG carries as a
``<title>`` (shown on hover and read out on focus) and the page repeats in a
table for those who do not use the picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from keyd.console.views import KeyRow
from keyd.model import KeyState

WIDTH = 1000
LABEL_WIDTH = 250  # the kid and state column on the left
PLOT_WIDTH = WIDTH - LABEL_WIDTH - 10
ROW_HEIGHT = 30
BAR_HEIGHT = 16
AXIS_HEIGHT = 34
WINDOWS = (7, 30, 90, 400)  # fixed windows (days) on offer; a quarter of each is the past
MAX_PAST = timedelta(days=90)  # the whole-picture window looks back at most this far
MAX_FUTURE = timedelta(days=800)
MAX_LABELS = 9  # past this many ticks, every other one is labelled


@dataclass(frozen=True)
class Drawn:
    """Something drawn on a key's row, with the label its ``<title>`` carries."""

    x: float
    y: float
    kind: str  # a Span's or a Mark's, listed below
    label: str

    @property
    def middle(self) -> float:
        return self.x

    @property
    def brief(self) -> str:
        """The label without the key's name, which its row already shows."""
        return self.label.partition(": ")[2] or self.label

    @property
    def anchor(self) -> str:
        """Where its label sits when shown: right of it, or left of it past the middle."""
        return "end" if self.middle > LABEL_WIDTH + PLOT_WIDTH / 2 else "start"


@dataclass(frozen=True)
class Span(Drawn):
    """A stretch of a key's life: published | active | planned | retired | awaiting."""

    width: float

    @property
    def middle(self) -> float:
        return self.x + self.width / 2


@dataclass(frozen=True)
class Mark(Drawn):
    """A moment in it: not_after | threshold | revoked."""


@dataclass(frozen=True)
class Tick:
    x: float
    label: str = ""  # none on every other tick when there are more than MAX_LABELS


@dataclass(frozen=True)
class Row:
    y: float
    kid: str
    short: str
    caption: str  # purpose and state


@dataclass(frozen=True)
class Timeline:
    width: int
    height: int
    plot_left: int
    plot_width: int
    axis_height: int
    start: datetime
    end: datetime
    now_x: float
    rows: list[Row]
    spans: list[Span]
    marks: list[Mark]
    ticks: list[Tick]


def when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def window(keys: list[KeyRow], now: datetime, days: int | None) -> tuple[datetime, datetime]:
    """``days`` wide (a quarter of it past), or, for None, the whole picture:
    back to the oldest live key's publication, on to the last expiry."""
    if days is not None:
        return now - timedelta(days=days) / 4, now + timedelta(days=days) * 3 / 4
    live = [k for k in keys if k.state not in (KeyState.DESTROYED, KeyState.REVOKED)]
    starts = [k.publish_at or k.created_at for k in live]
    ends = [t for k in live for t in (k.not_after, k.rotates_at, k.destroy_after,
                                       k.activates_at) if t is not None]
    start = max(min([now - timedelta(days=7), *starts]), now - MAX_PAST)
    end = min(max([now + timedelta(days=30), *ends]), now + MAX_FUTURE)
    margin = (end - start) * 0.03
    return start - margin, end + margin


def build(keys: list[KeyRow], now: datetime, thresholds: tuple[timedelta, ...],
          days: int | None = None) -> Timeline:
    start, end = window(keys, now, days)
    seconds = (end - start).total_seconds()

    def x_of(at: datetime) -> float:
        clamped = min(max(at, start), end)
        return round(LABEL_WIDTH + (clamped - start).total_seconds() / seconds * PLOT_WIDTH, 1)

    def visible(a: datetime, b: datetime) -> bool:
        return b >= start and a <= end and b > a

    shown = [k for k in keys if k.state is not KeyState.DESTROYED
             or (k.state_changed_at >= start)]
    rows: list[Row] = []
    spans: list[Span] = []
    marks: list[Mark] = []
    for i, key in enumerate(shown):
        y = AXIS_HEIGHT + i * ROW_HEIGHT
        bar_y = y + (ROW_HEIGHT - BAR_HEIGHT) / 2
        name = f"{key.purpose.value} key {key.kid_or_id}"
        rows.append(Row(y=y, kid=key.kid_or_id, short=_short(key.kid_or_id),
                        caption=f"{key.purpose.value}, {key.state.value.replace('_', ' ')}"))
        for kind, a, b in _periods(key, now):
            if visible(a, b):
                until = "now" if b == now else when(b)
                label = f"{name}: {kind.replace('_', ' ')} from {when(a)} until {until}"
                if kind == "planned":
                    label = f"{name}: active until its rotation, due {when(b)}"
                spans.append(Span(x=x_of(a), y=bar_y, width=max(1.0, x_of(b) - x_of(a)),
                                  kind=kind, label=label))
        if key.state is KeyState.REVOKED and start <= key.state_changed_at <= end:
            marks.append(Mark(x=x_of(key.state_changed_at), y=y, kind="revoked",
                              label=f"{name}: revoked {when(key.state_changed_at)} "
                                    f"({key.revoked_reason or 'no reason given'})"))
        if key.not_after is not None and key.state not in (KeyState.REVOKED, KeyState.DESTROYED):
            if start <= key.not_after <= end:
                marks.append(Mark(x=x_of(key.not_after), y=y, kind="not_after",
                                  label=f"{name}: certificate not after {when(key.not_after)}"))
            if key.state in (KeyState.ACTIVE, KeyState.PENDING):
                for threshold in thresholds:
                    at = key.not_after - threshold
                    if start <= at <= end:
                        marks.append(Mark(
                            x=x_of(at), y=y, kind="threshold",
                            label=f"{name}: expiry alert {_days(threshold)} before, {when(at)}"))
    height = AXIS_HEIGHT + max(1, len(rows)) * ROW_HEIGHT + 6
    return Timeline(width=WIDTH, height=height, plot_left=LABEL_WIDTH, plot_width=PLOT_WIDTH,
                    axis_height=AXIS_HEIGHT, start=start, end=end, now_x=x_of(now),
                    rows=rows, spans=spans, marks=marks, ticks=_ticks(start, end, x_of))


def _periods(key: KeyRow, now: datetime) -> list[tuple[str, datetime, datetime]]:
    """(kind, from, until) of each stretch of the key's life that has a start."""
    state = key.state
    ended = key.state_changed_at  # when it was revoked or destroyed
    out: list[tuple[str, datetime, datetime]] = []
    if state is KeyState.AWAITING_CERTIFICATE:
        out.append(("awaiting_certificate", key.created_at, now))
    if key.publish_at is not None:
        until = key.activated_at or key.retired_at
        if until is None:
            until = now if state is KeyState.PENDING else ended
        out.append(("published", key.publish_at, until))
    if key.activated_at is not None:
        until = key.retired_at or (now if state is KeyState.ACTIVE else ended)
        out.append(("active", key.activated_at, until))
        if state is KeyState.ACTIVE and key.rotates_at is not None and key.rotates_at > now:
            out.append(("planned", now, key.rotates_at))
    if key.retired_at is not None:
        until = key.destroy_after if state is KeyState.RETIRED else ended
        if until is not None:
            out.append(("retired", key.retired_at, until))
    return out


def _ticks(start: datetime, end: datetime, x_of: Callable[[datetime], float]) -> list[Tick]:
    days = (end - start).days
    if days <= 10:
        step, fmt = timedelta(days=1), "%b %d"
    elif days <= 60:
        step, fmt = timedelta(days=7), "%b %d"
    else:
        step, fmt = timedelta(days=0), "%b %Y"
    ticks: list[Tick] = []
    at = start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    if not step:
        at = (start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
              + timedelta(days=32)).replace(day=1)
    while at < end:
        ticks.append(Tick(x=x_of(at), label=at.strftime(fmt)))
        if step:
            at += step
        else:
            at = (at + timedelta(days=32)).replace(day=1)
    if len(ticks) > MAX_LABELS:
        # Keep every grid line, but label every other (or third...) so labels never touch.
        every = -(-len(ticks) // MAX_LABELS)
        ticks = [t if i % every == 0 else Tick(t.x) for i, t in enumerate(ticks)]
    return ticks


def _short(kid: str) -> str:
    return kid if len(kid) <= 18 else kid[:16] + "…"


def _days(delta: timedelta) -> str:
    if delta % timedelta(days=1) == timedelta(0):
        return f"{delta.days} d"
    return f"{delta.total_seconds() / 3600:g} h"
