"""THREATS "unsound keys": issuer keys with an even or oversized modulus, a
tiny exponent or an x5c leaf that is not the JWK's key are dropped, logged
with the reason by the daemon, and shown in `keyd status`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.jose import public_jwk
from tests.certs import self_signed
from tests.daemon import StaticServer, keyd, running
from tests.fixtures.jose import b64u

pytestmark = pytest.mark.slow  # a real keyd process per test or module

GOOD = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks() -> list[dict[str, Any]]:
    good = public_jwk(GOOD.public_key(), kid="good", use="sig", alg="PS256", chain=[])
    foreign_leaf = public_jwk(OTHER.public_key(), kid="x", use="sig", alg="PS256",
                              chain=[self_signed(OTHER, datetime.now(UTC), "other")])["x5c"]
    n = GOOD.public_key().public_numbers().n
    return [
        good,
        {**good, "kid": "even-modulus", "n": b64u((n + 1).to_bytes(256, "big"))},
        {**good, "kid": "huge-modulus", "n": b64u(((1 << 15999) | 1).to_bytes(2000, "big"))},
        {**good, "kid": "tiny-exponent", "e": "Aw"},
        {**good, "kid": "foreign-x5c", "x5c": foreign_leaf},
    ]


def test_unsound_issuer_keys_are_dropped_logged_and_shown_in_status(tmp_path: Path) -> None:
    server = StaticServer()
    server.body = json.dumps({"keys": jwks()}).encode()
    try:
        with running(tmp_path, {"issuers.paynet": {"jwks_uri": server.url}}) as daemon:
            status = keyd(daemon.config, "status").stdout
            as_json = json.loads(keyd(daemon.config, "status", "--json", "--issuers").stdout)
            plain_json = json.loads(keyd(daemon.config, "status", "--json").stdout)
    finally:
        server.close()
    log = (tmp_path / "keyd.log").read_text()
    reasons = {"even-modulus": "even", "huge-modulus": "16000 bits",
               "tiny-exponent": "exponent", "foreign-x5c": "x5c"}
    for kid, reason in reasons.items():
        assert any(kid in line and reason in line and "dropped" in line
                   for line in log.splitlines()), (kid, log[-2000:])
        assert any(kid in line and reason in line for line in status.splitlines()
                   if "dropped:" in line), (kid, status)
    assert "paynet" in status
    (issuer,) = as_json["issuers"]
    assert issuer["kids"] == ["good"] and len(issuer["dropped"]) == 4
    assert isinstance(plain_json, list)  # --json alone keeps its shape
