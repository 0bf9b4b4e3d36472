"""Property-based fuzzing of the verify, decrypt and unwrap paths.

Whatever bytes arrive, keyd answers with one of its own 4xx errors: never
another exception type (which the API would turn into a 500), never a token
accepted that was not made by the issuer's key.  The searches are
derandomised so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyd import config
from keyd.errors import KeydError
from keyd.service import Caller, KeyService
from keyd.tokens import TokenService
from tests.daemon import StaticServer, keyd, write_config
from tests.fixtures.jose import b64u

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "fuzz-issuer-1"


def issuer_jwk() -> dict[str, Any]:
    numbers = ISSUER_KEY.public_key().public_numbers()
    return {"kty": "RSA", "kid": KID, "use": "sig", "alg": "PS256",
            "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}


def sign(header: bytes, payload: bytes) -> str:
    signing_input = f"{b64u(header)}.{b64u(payload)}".encode()
    signature = ISSUER_KEY.sign(signing_input, padding.PSS(
        mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    return f"{signing_input.decode()}.{b64u(signature)}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenService, Caller]]:
    """KeyService + TokenService in this process, on an initialised sandbox store."""
    server = StaticServer()
    server.body = json.dumps({"keys": [issuer_jwk()]}).encode()
    folder: Path = tmp_path_factory.mktemp("fuzz")
    path = write_config(folder, {"issuers.fuzz": {"jwks_uri": server.url}})
    keyd(path, "init")
    service = KeyService.open(config.load(path))
    try:
        yield TokenService(service), service.admin_caller()
    finally:
        service.close()
        server.close()


def only_keyd_refusals(call: Any) -> None:
    try:
        call()
    except KeydError as e:
        assert 400 <= e.status < 500 or e.status == 503, (e.code, e.detail)
    else:
        raise AssertionError("a fuzzed token was accepted")


segment = st.one_of(
    st.binary(max_size=64).map(b64u),
    st.text(alphabet="ABCDEFabcdef0123456789-_.=+/ \x00é", max_size=40),
)
compact = st.lists(segment, min_size=1, max_size=6).map(".".join)

header_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=8,
)
header = st.dictionaries(
    st.sampled_from(["alg", "kid", "crit", "b64", "iat", "iss", "jti", "jku", "jwk", "x5c",
                     "typ", "cty", "enc", "zip", "p2c"]),
    header_value, max_size=6,
)


@FUZZ
@given(token=compact)
def test_random_compact_strings_never_verify_or_crash(
    stack: tuple[TokenService, Caller], token: str
) -> None:
    tokens, caller = stack
    only_keyd_refusals(lambda: tokens.verify_jws(caller, token, "fuzz"))
    only_keyd_refusals(lambda: tokens.decrypt_jwe(caller, token))
    only_keyd_refusals(lambda: tokens.unwrap(caller, token, "fuzz"))


@pytest.mark.slow  # the longest Hypothesis run (about 20 s)
@FUZZ
@given(fields=header, payload=st.binary(max_size=64))
def test_signed_tokens_with_fuzzed_headers_are_refused_unless_exactly_on_profile(
    stack: tuple[TokenService, Caller], fields: dict[str, Any], payload: bytes
) -> None:
    tokens, caller = stack
    raw = json.dumps(fields).encode()
    token = sign(raw, payload)
    on_profile = fields.get("alg") == "PS256" and fields.get("kid") == KID and set(fields) <= {
        "alg", "kid", "typ", "cty"} and all(isinstance(fields.get(k, ""), str)
                                            for k in ("typ", "cty"))
    if on_profile:
        assert tokens.verify_jws(caller, token, "fuzz").payload == payload
    else:
        only_keyd_refusals(lambda: tokens.verify_jws(caller, token, "fuzz"))


@FUZZ
@given(fields=header, parts=st.lists(st.binary(max_size=300), min_size=4, max_size=4))
def test_fuzzed_jwes_are_refused_with_keyd_errors(
    stack: tuple[TokenService, Caller], fields: dict[str, Any], parts: list[bytes]
) -> None:
    tokens, caller = stack
    token = ".".join([b64u(json.dumps(fields).encode()), *(b64u(p) for p in parts)])
    only_keyd_refusals(lambda: tokens.decrypt_jwe(caller, token))


@FUZZ
@given(inner=st.binary(max_size=200))
def test_unwrap_of_a_genuine_signature_over_garbage_is_refused(
    stack: tuple[TokenService, Caller], inner: bytes
) -> None:
    tokens, caller = stack
    token = sign(json.dumps({"alg": "PS256", "kid": KID}).encode(), inner)
    only_keyd_refusals(lambda: tokens.unwrap(caller, token, "fuzz"))


def test_fuzz_harness_accepts_a_genuine_token(stack: tuple[TokenService, Caller]) -> None:
    """The properties above are not vacuous: the same stack accepts a real token."""
    tokens, caller = stack
    payload = os.urandom(16)
    token = sign(json.dumps({"alg": "PS256", "kid": KID}).encode(), payload)
    assert tokens.verify_jws(caller, token, "fuzz").payload == payload
