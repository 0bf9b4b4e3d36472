"""What counts as secret material by name: one definition for the audit log and the logs.

The audit log *refuses* a detail key that names a secret (a programming
error, found in tests: the detail goes to admins and exports); the log
formatter (keyd/logs.py) *masks* the value of such a key.  Both ask
``names_secret``, so a word added here protects both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from keyd.clock import utc
from keyd.model import PRIVATE_JWK_MEMBERS  # whole key names only: "p" is secret, "pin_count" not

# Words that name secret material anywhere in a key (snake, kebab or camel case).
SECRET_WORDS = frozenset({
    "token", "tokens", "secret", "secrets", "pin", "password", "passwd", "passphrase",
    "payload", "plaintext", "credential", "credentials", "assertion", "bearer",
    "authorization", "cookie", "private", "privkey", "master", "jwt", "jws", "jwe",
})
# Names that end in a harmless word ("key", "id"): matched as the key's ending.
SECRET_PHRASES = ("api_key", "secret_id", "private_key", "master_key")

MAX_DETAIL_STRING = 512  # longer strings are cut: a log is no place for a document


def words(name: str) -> list[str]:
    """``name``'s lower-case words: ``vaultToken`` and ``vault-token`` both give vault, token."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def names_secret(name: str) -> bool:
    """True when a key called ``name`` would hold secret material."""
    parts = words(name)
    return (name.lower() in PRIVATE_JWK_MEMBERS or not SECRET_WORDS.isdisjoint(parts)
            or "_".join(parts).endswith(SECRET_PHRASES))


def clean_detail(value: Any, where: str = "detail") -> Any:
    """A JSON-safe copy of an audit event's detail; ValueError on a key naming a secret."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit {where}: key {key!r} is not a string")
            if names_secret(key):
                raise ValueError(
                    f"audit {where}: key {key!r} names secret material; "
                    "payloads, tokens and key material never go into the audit log"
                )
            out[key] = clean_detail(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [clean_detail(item, f"{where}[]") for item in value]
    if isinstance(value, Enum):
        return clean_detail(value.value, where)
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_STRING:
            return value[:MAX_DETAIL_STRING] + "...(truncated)"
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    raise ValueError(f"audit {where}: {type(value).__name__} is not a JSON value")
