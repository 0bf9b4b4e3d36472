"""The local API as strict as the JOSE core (issue 9), against the running
daemon over real sockets.  Tests are named for the THREATS.md rows they
cover: "claims", "policy scope", "output" and "lenient request".  Every token
keyd makes here is checked with joserfc; every hostile one must get a JSON
4xx (or a 200 without ``payload``), never a 5xx."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwe, jws
from joserfc.jwk import KeySet

from tests.daemon import REPO, Daemon, StaticServer, keyd, running
from tests.fixtures.jose import b64u
from tests.fixtures.jose import b64u_decode as unb64u

pytestmark = pytest.mark.slow  # a real keyd process per test or module

CLIENT_ID = "test-client-0001"  # tests/daemon.py's [keyd] client_id
TOKEN_ENDPOINT = "https://as.paynet.example/token"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PAYNET_KID, ACME_KID = "paynet-seam-1", "acme-seam-1"


def jwk(kid: str) -> dict[str, Any]:
    numbers = KEY.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "PS256",
            "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}


def token(header: dict[str, Any], payload: bytes | str, *, signature: bytes | None = None) -> str:
    """A compact PS256 JWS with exactly this header, signed by the issuers' key."""
    signing_input = f"{b64u(json.dumps(header))}.{b64u(payload)}".encode()
    if signature is None:
        signature = KEY.sign(signing_input, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                        salt_length=32), hashes.SHA256())
    return f"{signing_input.decode()}.{b64u(signature)}"


def paynet_header(**extra: Any) -> dict[str, Any]:
    """PayNet's message-signing profile: iss, iat, a fresh jti, all named in crit."""
    return {"alg": "PS256", "kid": PAYNET_KID, "iss": "paynet", "iat": int(time.time()),
            "jti": str(uuid.uuid4()), "crit": ["iss", "iat", "jti"], **extra}


ACME = {"alg": "PS256", "kid": ACME_KID}  # an issuer with no header profile


POLICIES = {
    # Signs and makes client assertions, for its own client_id to one token endpoint.
    "scoped": {"operations": ["sign", "client_assertion"], "purposes": ["signing"],
               "client_ids": ["$client_id"], "audiences": [TOKEN_ENDPOINT]},
    # Signs, but may not make client assertions.
    "signonly": {"operations": ["sign"], "purposes": ["signing"],
                 "client_ids": ["$client_id"], "audiences": ["*"]},
}


def write_policies(folder: Path) -> Path:
    target = folder / "policies"
    target.mkdir()
    for shipped in (REPO / "policies").glob("*.toml"):
        shutil.copy(shipped, target)
    for name, values in POLICIES.items():
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        (target / f"{name}.toml").write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def issuers() -> Iterator[dict[str, StaticServer]]:
    servers = {"paynet": StaticServer(), "acme": StaticServer()}
    servers["paynet"].body = json.dumps({"keys": [jwk(PAYNET_KID)]}).encode()
    servers["acme"].body = json.dumps({"keys": [jwk(ACME_KID)]}).encode()
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory,
           issuers: dict[str, StaticServer]) -> Iterator[Daemon]:
    folder = tmp_path_factory.mktemp("seam")
    with running(folder, {
        "keyd": {"policies_dir": str(write_policies(folder))},
        "issuers.paynet": {"jwks_uri": issuers["paynet"].url, "iss": "paynet",
                           "require": ["iat", "jti", "iss"], "leeway": "10s",
                           "link_prefixes": ["https://dp.example.my/ofm/"],
                           "redirect_uri_prefixes": ["https://tpp.example/cb/"]},
        "issuers.acme": {"jwks_uri": issuers["acme"].url},
    }) as d:
        yield d


@pytest.fixture(scope="module")
def svc(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.service_token) as client:
        yield client


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.admin_token) as client:
        yield client


def client_for(daemon: Daemon, policy: str) -> httpx.Client:
    name = f"{policy}-{uuid.uuid4().hex[:8]}"
    secret = keyd(daemon.config, "client", "add", name, "--policy", policy).stdout.strip()
    return daemon.client(secret)


@pytest.fixture(scope="module")
def scoped(daemon: Daemon) -> Iterator[httpx.Client]:
    with client_for(daemon, "scoped") as client:
        yield client


@pytest.fixture(scope="module")
def signonly(daemon: Daemon) -> Iterator[httpx.Client]:
    with client_for(daemon, "signonly") as client:
        yield client


def our_keys(daemon: Daemon) -> KeySet:
    with daemon.public() as public:
        return KeySet.import_key_set(public.get("/jwks").json())


def encrypt_to_us(daemon: Daemon, plaintext: bytes) -> str:
    """A JWE anyone can make: our encryption key is public."""
    key = next(k for k in our_keys(daemon).keys if k.get("use") == "enc")
    return jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": key.kid},
                               plaintext, key, algorithms=["RSA-OAEP-256", "A256GCM"])


def refused(answer: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "detail"}, body
    if error is not None:
        assert body["error"] == error, body
    return dict(body)


def audit_events(daemon: Daemon, action: str) -> list[dict[str, Any]]:
    out = keyd(daemon.config, "audit", "--action", action, "--json", "--limit", "10000").stdout
    events: list[dict[str, Any]] = json.loads(out)  # one JSON document: a list of events
    return events


def link(consent_id: str, signature: str, *, prefix: str = "https://dp.example.my/ofm/my/",
         redirect_uri: str | None = "https://tpp.example/cb/1") -> str:
    url = f"{prefix}authorize/ais?consent_id={consent_id}&signature={signature}"
    if redirect_uri is not None:
        url += "&" + urlencode({"redirect_uri": redirect_uri})
    return url


# ---------------------------------------------------------------------- claims

NOW = int(time.time())
BAD_TIME_CLAIMS = {
    "exp a day past": {"exp": NOW - 86400},
    "exp tomorrow as text": {"exp": "tomorrow"},
    "exp true": {"exp": True},
    "exp 1e308": {"exp": 1e308},
    "exp a float": {"exp": NOW + 600.5},
    "nbf an hour ahead": {"exp": NOW + 7200, "nbf": NOW + 3600},
    "nbf as text": {"nbf": str(NOW)},
    "iat an hour ahead": {"iat": NOW + 3600},
    "iat a list": {"iat": [NOW]},
}


def send_claims_to_every_door(daemon: Daemon, svc: httpx.Client, claims: dict[str, Any]
                              ) -> list[httpx.Response]:
    payload = json.dumps(claims)
    jws_answer = svc.post("/v1/verify/jws", json={"jws": token(ACME, payload),
                                                  "issuer": "acme"})
    inner = encrypt_to_us(daemon, payload.encode())
    unwrap_answer = svc.post("/v1/unwrap", json={"jws": token(ACME, inner), "issuer": "acme"})
    # A consent id is whatever the issuer signed; one that is a JSON object
    # carries claims, and they must hold at this door too.
    consent = payload.replace(" ", "")
    url = "https://dp.example.my/ofm/my/authorize/ais?" + urlencode(
        {"consent_id": consent, "signature": token(ACME, consent)})
    link_answer = svc.post("/v1/verify/universal-link", json={"url": url, "issuer": "acme"})
    return [jws_answer, unwrap_answer, link_answer]


@pytest.mark.parametrize("case", sorted(BAD_TIME_CLAIMS))
def test_claims_exp_nbf_iat_must_be_integers_that_hold_on_every_verify_door(
    daemon: Daemon, svc: httpx.Client, case: str
) -> None:
    for answer in send_claims_to_every_door(daemon, svc, BAD_TIME_CLAIMS[case]):
        refused(answer, 422, "invalid_token")
    assert daemon.healthy()


def test_claims_that_hold_pass_every_verify_door(daemon: Daemon, svc: httpx.Client) -> None:
    claims = {"exp": int(time.time()) + 600, "nbf": int(time.time()) - 5,
              "iat": int(time.time())}
    jws_answer, unwrap_answer, link_answer = send_claims_to_every_door(daemon, svc, claims)
    assert jws_answer.status_code == 200, jws_answer.text
    assert jws_answer.json()["payload"] == claims
    assert unwrap_answer.status_code == 200, unwrap_answer.text
    assert unwrap_answer.json()["payload"] == claims
    assert link_answer.status_code == 200, link_answer.text


def test_claims_exp_within_the_leeway_is_accepted(svc: httpx.Client) -> None:
    claims = json.dumps({"exp": int(time.time()) - 3})  # leeway is 10 s
    answer = svc.post("/v1/verify/jws", json={"jws": token(ACME, claims), "issuer": "acme"})
    assert answer.status_code == 200, answer.text


def test_claims_a_json_looking_payload_that_is_not_strict_json_is_refused(
    svc: httpx.Client
) -> None:
    """A lenient reader would see exp 9999999999 here; keyd never checked it."""
    payload = '{"exp": 1, "exp": 9999999999}'
    answer = svc.post("/v1/verify/jws", json={"jws": token(ACME, payload), "issuer": "acme"})
    refused(answer, 422, "invalid_token")


def test_claims_iss_claim_must_be_the_issuers(svc: httpx.Client) -> None:
    for iss in ("paynet-evil", ["paynet"], "PAYNET"):
        payload = json.dumps({"iss": iss})
        answer = svc.post("/v1/verify/jws", json={"jws": token(paynet_header(), payload),
                                                  "issuer": "paynet"})
        refused(answer, 422, "invalid_token")


@pytest.mark.parametrize("missing", ["iat", "jti", "iss"])
def test_claims_a_message_without_the_members_its_issuer_requires_is_refused(
    daemon: Daemon, svc: httpx.Client, missing: str
) -> None:
    header = paynet_header()
    del header[missing]
    header["crit"] = [n for n in header["crit"] if n != missing]
    compact = token(header, b"{}")
    detail = refused(svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "paynet"}),
                     422, "invalid_token")["detail"]
    assert missing in detail
    refused(svc.post("/v1/unwrap", json={"jws": compact, "issuer": "paynet"}), 422)
    consent = str(uuid.uuid4())
    url = link(consent, token(header, consent))
    refused(svc.post("/v1/verify/universal-link", json={"url": url}), 422)


def test_claims_the_same_token_is_never_accepted_twice(svc: httpx.Client) -> None:
    compact = token(paynet_header(), b'{"ok": true}')
    first = svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "paynet"})
    assert first.status_code == 200, first.text
    refused(svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "paynet"}), 422)


def test_claims_a_token_refused_for_its_claims_does_not_burn_its_jti(svc: httpx.Client) -> None:
    header = paynet_header()
    expired = token(header, json.dumps({"exp": int(time.time()) - 3600}))
    refused(svc.post("/v1/verify/jws", json={"jws": expired, "issuer": "paynet"}), 422)
    fine = token(header, json.dumps({"exp": int(time.time()) + 600}))
    answer = svc.post("/v1/verify/jws", json={"jws": fine, "issuer": "paynet"})
    assert answer.status_code == 200, answer.text


def test_claims_a_jti_without_iat_is_refused(svc: httpx.Client) -> None:
    compact = token({**ACME, "jti": str(uuid.uuid4())}, b"{}")
    detail = refused(svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "acme"}),
                     422, "invalid_token")["detail"]
    assert "iat" in detail


def test_claims_crit_naming_iss_without_an_expected_iss_is_refused_saying_so(
    svc: httpx.Client
) -> None:
    header = {**ACME, "iss": "acme", "iat": int(time.time()), "jti": str(uuid.uuid4()),
              "crit": ["iss", "iat", "jti"]}
    detail = refused(svc.post("/v1/verify/jws", json={"jws": token(header, b"{}"),
                                                      "issuer": "acme"}),
                     422, "invalid_token")["detail"]
    assert "crit names iss" in detail


def test_claims_an_rsa_signature_one_octet_short_is_refused(svc: httpx.Client) -> None:
    for i in range(5000):
        compact = token(ACME, f"short-{i}")
        h, p, s = compact.split(".")
        raw = unb64u(s)
        if raw[0] == 0:  # about one in 256 signatures starts with a zero octet
            short = f"{h}.{p}.{b64u(raw[1:])}"
            assert svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "acme"}
                            ).status_code == 200
            refused(svc.post("/v1/verify/jws", json={"jws": short, "issuer": "acme"}),
                    422, "invalid_signature")
            return
    raise AssertionError("no signature with a leading zero octet in 5000 tries")


def test_claims_universal_link_prefixes_are_checked_when_configured(svc: httpx.Client) -> None:
    consent = str(uuid.uuid4())
    good = svc.post("/v1/verify/universal-link",
                    json={"url": link(consent, token(paynet_header(), consent))})
    assert good.status_code == 200, good.text
    for url in (
        link(consent, token(paynet_header(), consent), prefix="https://dp.example.my.evil.test/ofm/"),
        link(consent, token(paynet_header(), consent), prefix="https://dp.example.my/other/"),
        link(consent, token(paynet_header(), consent), redirect_uri="https://evil.test/cb/"),
        link(consent, token(paynet_header(), consent), redirect_uri="https://tpp.example/cb"),
        link(consent, token(paynet_header(), consent), redirect_uri=None),
    ):
        refused(svc.post("/v1/verify/universal-link", json={"url": url}), 422, "invalid_token")


# ---------------------------------------------------------------------- policy scope


def assertion_claims(iss: str = CLIENT_ID, aud: str = TOKEN_ENDPOINT) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": iss, "sub": iss, "aud": aud, "iat": now, "exp": now + 600,
            "jti": str(uuid.uuid4())}


@pytest.mark.parametrize("door", ["payload", "payload_b64", "jwt"])
@pytest.mark.parametrize("who", ["foreign client_id", "foreign audience"])
def test_policy_scope_a_forged_assertion_is_403_at_every_signing_door(
    scoped: httpx.Client, door: str, who: str
) -> None:
    claims = (assertion_claims(iss="someone-else") if who == "foreign client_id"
              else assertion_claims(aud="https://as.evil.test/token"))
    if door == "jwt":
        answer = scoped.post("/v1/sign/jwt", json={"claims": claims})
    elif door == "payload":
        answer = scoped.post("/v1/sign/jws", json={"payload": claims})
    else:
        answer = scoped.post("/v1/sign/jws", json={"payload_b64": b64u(json.dumps(claims))})
    refused(answer, 403, "forbidden")


def test_policy_scope_binds_aud_in_jwt_claims_and_extra_headers(scoped: httpx.Client) -> None:
    refused(scoped.post("/v1/sign/jwt", json={"claims": {"aud": ["https://as.evil.test/"]}}),
            403, "forbidden")
    refused(scoped.post("/v1/sign/jwt", json={"claims": {"aud": 7}}), 400, "bad_request")
    for header in ({"iss": "someone-else"}, {"sub": "someone-else"},
                   {"aud": "https://as.evil.test/token"}):
        answer = scoped.post("/v1/sign/jws", json={"payload_b64": b64u(b"body"),
                                                   "detached": True, "header": header})
        refused(answer, 403, "forbidden")


def test_policy_scope_allows_what_the_policy_names(daemon: Daemon, scoped: httpx.Client) -> None:
    claims = assertion_claims()
    answer = scoped.post("/v1/sign/jws", json={"payload": claims})
    assert answer.status_code == 200, answer.text
    verified = jws.deserialize_compact(answer.json()["jws"], our_keys(daemon),
                                       algorithms=["PS256"])
    assert json.loads(verified.payload) == claims
    jwt_answer = scoped.post("/v1/sign/jwt", json={"claims": {"aud": TOKEN_ENDPOINT}})
    assert jwt_answer.status_code == 200, jwt_answer.text


def test_policy_scope_a_duplicate_member_cannot_smuggle_a_foreign_iss(
    scoped: httpx.Client
) -> None:
    payload = f'{{"iss":"{CLIENT_ID}","sub":"{CLIENT_ID}","iss":"someone-else"}}'.encode()
    refused(scoped.post("/v1/sign/jws", json={"payload_b64": b64u(payload)}), 400,
            "bad_request")


def test_policy_scope_an_assertion_by_the_back_door_needs_client_assertion(
    signonly: httpx.Client
) -> None:
    claims = assertion_claims()
    refused(signonly.post("/v1/sign/jws", json={"payload": claims}), 403, "forbidden")
    refused(signonly.post("/v1/sign/jws", json={"payload_b64": b64u(json.dumps(claims))}),
            403, "forbidden")
    jwt_claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": TOKEN_ENDPOINT}
    refused(signonly.post("/v1/sign/jwt", json={"claims": jwt_claims}), 403, "forbidden")
    refused(signonly.post("/v1/client-assertion", json={"audience": TOKEN_ENDPOINT}), 403)
    # Signing as itself, but not an assertion: fine.
    ok = signonly.post("/v1/sign/jws", json={"payload": {"iss": CLIENT_ID, "data": 1}})
    assert ok.status_code == 200, ok.text


def test_policy_scope_is_checked_before_the_body_is_read(
    daemon: Daemon, signonly: httpx.Client
) -> None:
    """A call the policy forbids is 403 whatever (or however little) the body is."""
    for content in (b"", b"not json", b'{"jwe": 5, "unknown": 1}'):
        answer = signonly.post("/v1/decrypt/jwe", content=content,
                               headers={"Content-Type": "text/plain"})
        refused(answer, 403, "forbidden")


# ---------------------------------------------------------------------- output


HOSTILE_CONTENT = {
    "NaN": b"NaN",
    "Infinity": b"-Infinity",
    "1e999": b"1e999",
    "NaN in an object": b'{"a": NaN}',
    "lone surrogate": b'"\\ud800"',
    "lone surrogate member name": b'{"\\udc00": 1}',
    "duplicate members": b'{"a": 1, "a": 2}',
    "nested 100 deep": b"[" * 100 + b"]" * 100,
    "not UTF-8": b'"\xff\xfe"',
    "plain text": b"hello",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONTENT))
def test_output_hostile_jwe_content_is_answered_as_base64url_without_payload(
    daemon: Daemon, svc: httpx.Client, case: str
) -> None:
    plaintext = HOSTILE_CONTENT[case]
    before = len(audit_events(daemon, "decrypt.jwe"))
    answer = svc.post("/v1/decrypt/jwe", json={"jwe": encrypt_to_us(daemon, plaintext)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert unb64u(body["plaintext_b64"]) == plaintext
    assert "payload" not in body and isinstance(body["payload_error"], str)
    events = audit_events(daemon, "decrypt.jwe")[before:]
    assert [e["outcome"] for e in events] == ["ok"]  # what was answered: a 200
    assert daemon.healthy()


@pytest.mark.parametrize("case", sorted(set(HOSTILE_CONTENT) - {"NaN in an object",
                                                                "lone surrogate member name",
                                                                "duplicate members"}))
def test_output_hostile_verified_content_is_answered_without_payload(
    daemon: Daemon, svc: httpx.Client, case: str
) -> None:
    content = HOSTILE_CONTENT[case]
    answer = svc.post("/v1/verify/jws", json={"jws": token(ACME, content), "issuer": "acme"})
    assert answer.status_code == 200, answer.text
    assert unb64u(answer.json()["payload_b64"]) == content
    assert "payload" not in answer.json()
    inner = encrypt_to_us(daemon, content)
    unwrapped = svc.post("/v1/unwrap", json={"jws": token(ACME, inner), "issuer": "acme"})
    assert unwrapped.status_code == 200, unwrapped.text
    assert "payload" not in unwrapped.json() and unwrapped.json()["payload_error"]


def test_output_an_object_that_is_not_strict_json_is_refused_at_verify_doors(
    daemon: Daemon, svc: httpx.Client
) -> None:
    """Content that starts like an object carries claims: unreadable ones are 422."""
    before = audit_events(daemon, "verify.jws")
    for content in (b'{"a": NaN}', b'{"\\udc00": 1}', b'{"a": 1, "a": 2}'):
        answer = svc.post("/v1/verify/jws", json={"jws": token(ACME, content), "issuer": "acme"})
        refused(answer, 422, "invalid_token")
    after = audit_events(daemon, "verify.jws")[len(before):]
    assert [(e["outcome"], e["detail"]["status"]) for e in after] == [("refused", 422)] * 3


# ---------------------------------------------------------------------- lenient requests


def signed_count(daemon: Daemon) -> int:
    return sum(e["outcome"] == "ok" for e in audit_events(daemon, "sign.jws"))


@pytest.mark.parametrize(
    "content, status, words",
    [
        (b'{"payload_b64": "***"}', 400, "payload_b64"),
        (b'{"payload_b64": "aGk="}', 400, "payload_b64"),
        (b'{"payload_b64": "aGl"}', 400, "payload_b64"),
        (b'{"payload": "x", "detatched": true}', 400, "detatched"),
        (b'{"payload": "x", "payload_b64": "eA"}', 400, "exactly one"),
        (b'{"payload": NaN}', 400, "NaN"),
        (b'{"payload": 1e999}', 400, "1e999"),
        (b'{"payload": "\\ud800"}', 400, "surrogate"),
        (b'{"payload": "x", "payload": "y"}', 400, "twice"),
    ],
)
def test_lenient_request_is_refused_naming_the_problem_and_nothing_is_signed(
    daemon: Daemon, svc: httpx.Client, content: bytes, status: int, words: str
) -> None:
    before = signed_count(daemon)
    answer = svc.post("/v1/sign/jws", content=content,
                      headers={"Content-Type": "application/json"})
    assert words in refused(answer, status, "bad_request")["detail"]
    assert signed_count(daemon) == before
    refusal = audit_events(daemon, "sign.jws")[-1]
    assert refusal["outcome"] == "refused" and refusal["detail"]["status"] == status


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1"])
def test_lenient_request_a_body_that_is_not_declared_json_is_415(
    svc: httpx.Client, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = svc.post("/v1/sign/jws", content=b'{"payload": "x"}', headers=headers)
    refused(answer, 415, "unsupported_media_type")


def test_lenient_request_json_with_a_charset_is_fine(svc: httpx.Client) -> None:
    answer = svc.post("/v1/sign/jws", content=b'{"payload": "x"}',
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert answer.status_code == 200, answer.text


def test_wrong_method_is_405_with_allow(svc: httpx.Client) -> None:
    answer = svc.get("/v1/sign/jws")
    refused(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == "POST"
    answer = svc.post("/v1/keys")
    refused(answer, 405)
    assert "GET" in answer.headers["allow"]
    refused(svc.get("/v1/no-such-call"), 404, "not_found")


def test_401_carries_www_authenticate_bearer(daemon: Daemon) -> None:
    with daemon.client() as anonymous:
        answer = anonymous.post("/v1/sign/jws", json={"payload": "x"})
    refused(answer, 401, "unauthorized")
    assert answer.headers["www-authenticate"].startswith("Bearer")


def test_unauthenticated_is_401_before_the_body_is_looked_at(daemon: Daemon) -> None:
    with daemon.client("not-a-token") as client:
        answer = client.post("/v1/sign/jws", content=b"garbage",
                             headers={"Content-Type": "text/plain"})
    refused(answer, 401, "unauthorized")


def test_action_calls_take_an_empty_body_and_a_service_gets_403_not_400(
    daemon: Daemon, svc: httpx.Client, admin: httpx.Client
) -> None:
    refused(svc.post("/v1/keys/signing/rotate"), 403, "forbidden")
    refused(svc.post("/v1/keys/x/revoke"), 403, "forbidden")
    rotated = admin.post("/v1/keys/encryption/rotate")
    assert rotated.status_code == 200, rotated.text
    pending = rotated.json()["key"]
    assert pending["state"] == "pending"
    revoked = admin.post(f"/v1/keys/{pending['kid']}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["key"]["state"] == "revoked"
    refused(admin.post("/v1/keys/signing/rotate", json={"later": True}), 400, "bad_request")
    assert daemon.healthy()
