"""Templating: the Jinja2 environment and the filters that put times on a page."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from urllib.parse import quote

import jinja2

from keyd.clock import utc


def _when(at: datetime | None) -> str:
    return "—" if at is None else utc(at).strftime("%Y-%m-%d %H:%M UTC")


def _iso(at: datetime | None) -> str:
    return "" if at is None else utc(at).isoformat().replace("+00:00", "Z")


def relative(at: datetime | None, now: datetime) -> str:
    """'in 3 d 4 h' or '2 h 5 min ago': a countdown a person reads at a glance."""
    if at is None:
        return ""
    delta = utc(at) - now
    past = delta < timedelta(0)
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        text = f"{days} d {hours} h"
    elif hours:
        text = f"{hours} h {minutes} min"
    elif minutes:
        text = f"{minutes} min"
    else:
        text = f"{seconds} s"
    return f"{text} ago" if past else f"in {text}"


def duration(delta: timedelta) -> str:
    """A lifecycle setting as config.toml spells it: 15m, 2d, 36h."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("keyd.console", "templates"),
        # Every value is escaped: a client name or a revoke reason with HTML
        # in it is shown as text, never as markup.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["iso"] = _iso
    env.filters["duration"] = duration
    env.filters["path"] = lambda value: quote(str(value), safe="")
    # Audit details as they were recorded: text as is, anything else as JSON.
    env.filters["plain"] = lambda value: value if isinstance(value, str) else json.dumps(value)
    return env
