"""docs/config.md lists every key keyd reads, and config errors help the reader.

The keys read are collected from real loads of a config that turns on every
optional table (webhook, SMTP, an issuer, transport deployment), once per
backend kind (each backend's plugin reads its own table), by recording each
key the settings reader asks for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from keyd import backends, config
from keyd.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
EVERY_TABLE: dict[str, Any] = {
    "keyd": {"client_id": "c", "organisation": "o"},
    "alerts": {"webhook": {"url": "https://alerts.example/hook"},
               "smtp": {"host": "smtp.example", "from": "keyd@example", "to": ["ops@example"]}},
    "issuers": {"paynet": {"jwks_uri": "https://paynet.example/jwks"}},
    "deploy": {"transport": {}},
}
# Tables named by the operator (a purpose, an issuer) are documented once, generically.
GENERIC = [(re.compile(r"^lifecycle\.\w+$"), "lifecycle.<purpose>"),
           (re.compile(r"^issuers\.\w+$"), "issuers.<name>")]


def keys_read(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    read: set[tuple[str, str]] = set()
    original = config.Table.get

    def recording(table: config.Table, key: str, default: object) -> object:
        if not isinstance(default, dict):  # a sub-table is a heading, not a key
            read.add((table.where, key))
        return original(table, key, default)

    monkeypatch.setattr(config.Table, "get", recording)
    for kind in backends.KINDS:
        config.from_dict({**EVERY_TABLE, "backend": {"kind": kind}},
                         Path("/etc/keyd/config.toml"))
    return read


def documented() -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    table = None
    for line in DOCS.read_text().splitlines():
        if heading := re.match(r"^## \[(.+)\]$", line):
            table = heading.group(1).replace("&lt;", "<").replace("&gt;", ">")
        elif table and (row := re.match(r"^\| `([a-z0-9_]+)` \|", line)):
            keys.add((table, row.group(1)))
    return keys


def generic(table: str) -> str:
    for pattern, name in GENERIC:
        if pattern.match(table):
            return name
    return table


def test_every_key_keyd_reads_is_in_docs_config_md(monkeypatch: pytest.MonkeyPatch) -> None:
    read = {(generic(table), key) for table, key in keys_read(monkeypatch)}
    assert len(read) > 60  # the recorder saw the whole reader
    assert {table for table, _ in read} >= {f"backend.{kind}" for kind in backends.KINDS}
    missing = sorted(f"[{t}] {k}" for t, k in read - documented())
    assert missing == [], f"document these in docs/config.md: {missing}"


@pytest.mark.parametrize(("raw", "message"), [
    ({"public": {"max_agee": 300}}, "[public] has unknown key 'max_agee'; did you mean `max_age`?"),
    ({"lifecycle": {"signing": {"rotate_afer": "90d"}}},
     "[lifecycle.signing] has unknown key 'rotate_afer'; did you mean `rotate_after`?"),
    ({"kyed": {}}, "unknown table 'kyed'; did you mean `keyd`?"),
    ({"public": {"zzz": 1}}, "[public] has unknown key 'zzz'"),
])
def test_unknown_key_names_it_and_suggests_the_nearest(raw: dict[str, Any], message: str) -> None:
    tables = {**EVERY_TABLE, "keyd": {**EVERY_TABLE["keyd"]}, **raw}
    with pytest.raises(ConfigError) as raised:
        config.from_dict(tables, Path("/etc/keyd/config.toml"))
    assert raised.value.detail == message


@pytest.mark.parametrize(("raw", "message"), [
    ({"lifecycle": {"signing": {"key_size": 1024}}},
     "[lifecycle.signing] key_size: 1024 is not 2048, 3072 or 4096"),
    ({"keyd": {"kid": "sha1"}},
     "[keyd] kid: 'sha1' is not x5t#S256, rfc7638, ob-uk or assigned"),
    ({"issuers": {"p": {"jwks_uri": "https://p.example/jwks", "algorithms": ["RS256", "HS256"]}}},
     "[issuers.p] algorithms: RS256 and HS256 not allowed; use "
     "ES256, ES384, ES512, PS256, PS384 or PS512"),
])
def test_value_errors_list_valid_values_in_plain_words(raw: dict[str, Any], message: str) -> None:
    tables = {**EVERY_TABLE, **raw}
    tables["keyd"] = {**EVERY_TABLE["keyd"], **raw.get("keyd", {})}
    with pytest.raises(ConfigError) as raised:
        config.from_dict(tables, Path("/etc/keyd/config.toml"))
    assert raised.value.detail == message
    assert "[" not in message.split(":", 1)[1] and "<" not in message  # no Python repr
