"""The primitives every config section is read with: a strict TOML table,
durations, paths, and values listed in plain words.

Backends read their own ``[backend.<kind>]`` table with :class:`Table` too, so
an unknown key there is refused with the same message as anywhere else.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from keyd.errors import ConfigError

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_T = TypeVar("_T")


def one_of(values: Iterable[object], last: str = "or") -> str:
    """Values in plain words: ``2048, 3072 or 4096`` (never a Python repr of a list)."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def parse_duration(value: object, where: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"`` (``"0s"`` allowed) -> timedelta."""
    if not isinstance(value, str) or not (m := _DURATION.match(value.strip())):
        raise ConfigError(f"{where}: {value!r} is not a duration like \"90s\", \"15m\", \"7d\"")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def resolve_path(base: Path, value: str) -> Path:
    """``value`` with ``~`` expanded; relative to ``base`` unless absolute."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


class Table:
    """A TOML table that remembers which keys were read, to refuse unknown ones."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"[{where}] must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, default: object) -> object:
        """The raw value, recorded as read (typed readers below check it)."""
        self.seen.add(key)
        return self.data.get(key, default)

    def name(self, key: str) -> str:
        return f"[{self.where}] {key}"

    def text(self, key: str, default: str) -> str:
        return self._typed(key, default, str, "a string")

    def integer(self, key: str, default: int) -> int:
        return self._typed(key, default, int, "an integer")

    def flag(self, key: str, default: bool) -> bool:
        return self._typed(key, default, bool, "true or false")

    def _typed(self, key: str, default: _T, kind: type[_T], what: str) -> _T:
        value = self.get(key, default)
        # bool is an int to Python, but `port = true` in a config is a mistake, not 1.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.name(key)} must be {what}, not {value!r}")
        return value

    def duration(self, key: str, default: str) -> timedelta:
        return parse_duration(self.get(key, default), self.name(key))

    def table(self, key: str) -> Table:
        return Table(self.get(key, {}), f"{self.where}.{key}" if self.where else key)

    def optional_path(self, key: str, base: Path) -> Path | None:
        """A path relative to ``base``, or None when the key is unset or empty."""
        value = self.text(key, "")
        return resolve_path(base, value) if value else None

    def str_list(self, key: str, default: list[str]) -> list[str]:
        value = self.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.name(key)} must be a list of strings, not {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            where = f"[{self.where}] has unknown key" if self.where else "unknown table"
            near = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.6)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            raise ConfigError(f"{where} {unknown[0]!r}{hint}")

