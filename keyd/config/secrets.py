"""Secrets: never from config.toml itself, and never shown.

A secret comes from a file, an environment variable or a systemd credential,
and prints masked in a repr, a str or a log line.
"""

from __future__ import annotations

import os
from pathlib import Path

from keyd.errors import ConfigError


class Secret:
    """A secret value that never shows itself in repr, str or a log line."""

    __slots__ = ("_value", "source")

    def __init__(self, value: bytes, source: str) -> None:
        self._value = value
        self.source = source  # where it came from, safe to log

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source}, '**********')"

    __str__ = __repr__


def read_secret(file: Path | None, env: str, credential: str) -> Secret | None:
    """The first of: a file, an environment variable, a systemd credential."""
    if file is not None and file.is_file():
        return Secret(file.read_bytes().strip(), f"file {file}")
    if env and (value := os.environ.get(env)):
        return Secret(value.strip().encode(), f"${env}")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and credential and (path := Path(creds) / credential).is_file():
        return Secret(path.read_bytes().strip(), f"systemd credential {credential}")
    return None



def require_secret(file: Path | None, env: str, credential: str, *, missing: str,
                   key: str) -> Secret:
    """:func:`read_secret`, or a ConfigError that says the three ways to give it:
    "``missing``: set ``key``, $ENV or the systemd credential NAME"."""
    secret = read_secret(file, env, credential)
    if secret is None:
        raise ConfigError(f"{missing}: set {key}, ${env} or the systemd credential {credential}")
    return secret
