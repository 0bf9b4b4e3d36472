"""Logs: real secrets pushed through every logging path, in both formats,
never reach the output; the text around them does."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jws
from joserfc.jwk import RSAKey

from keyd.logs import REDACTED, redact, setup_logging, wants_json
from tests.fixtures.jose import b64u as _b64url

BEFORE, AFTER = "<<before-marker", "after-marker>>"


@dataclass(frozen=True)
class Secret:
    name: str
    text: str              # what the careless call site logs
    must_not_appear: list[str]


def _text(member: object) -> str:
    """A private JWK member, which joserfc types as str or list: these are all str."""
    assert isinstance(member, str), member
    return member


def _secrets() -> list[Secret]:
    rsa_jwk = RSAKey.generate_key(2048)
    private = rsa_jwk.as_dict(private=True)
    compact = jws.serialize_compact({"alg": "PS256", "kid": "k1"}, b'{"sub":"me"}', rsa_jwk,
                                    algorithms=["PS256"])
    pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    pem_body = [line for line in pem.splitlines() if "-----" not in line]
    master = _b64url(os.urandom(32))
    keyd_token = "keyd_" + secrets.token_urlsafe(32)
    vault_token = "hvs." + secrets.token_urlsafe(68)
    legacy_vault = "s." + secrets.token_hex(12)
    pin = str(secrets.randbelow(10**8)).zfill(8)
    secret_id = str(uuid.uuid4())
    vault_header = secrets.token_hex(16)
    return [
        Secret("keyd-token", keyd_token, [keyd_token, keyd_token[5:]]),
        Secret("bearer-header", f"Authorization: Bearer {keyd_token}", [keyd_token[5:]]),
        Secret("compact-jws", compact, [compact, *compact.split(".")]),
        Secret("private-pem", pem, pem_body),
        Secret("private-jwk", json.dumps(private),
               [_text(private[m]) for m in ("d", "p", "q", "dp", "dq", "qi")]),
        Secret("master-key-line", f"KEYD_MASTER_KEY={master}", [master]),
        Secret("master-key-prose", f"loaded master key {master}", [master]),
        Secret("vault-token", vault_token, [vault_token, vault_token[4:]]),
        Secret("vault-legacy-token", legacy_vault, [legacy_vault[2:]]),
        Secret("vault-header", f"X-Vault-Token: {vault_header}", [vault_header]),
        Secret("pin-equals", f"pin={pin}", [pin]),
        Secret("pin-colon", f"PIN: {pin}", [pin]),
        Secret("approle-secret-id", f"secret_id {secret_id}", [secret_id]),
    ]


SECRETS = _secrets()


def _log_percent_arg(log: logging.Logger, secret: str) -> None:
    log.info("%s %s %s", BEFORE, secret, AFTER)


def _log_fstring(log: logging.Logger, secret: str) -> None:
    log.info(f"{BEFORE} {secret} {AFTER}")  # the careless call site, on purpose


def _log_repr_of_bytes(log: logging.Logger, secret: str) -> None:
    log.info("%s %r %s", BEFORE, secret.encode(), AFTER)


def _log_dict_arg(log: logging.Logger, secret: str) -> None:
    log.info("%s %s %s", BEFORE, {"nested": [secret]}, AFTER)


def _log_extra(log: logging.Logger, secret: str) -> None:
    log.info("%s %s", BEFORE, AFTER, extra={"x": secret, "detail": {"inner": secret}})


def _log_exception(log: logging.Logger, secret: str) -> None:
    try:
        raise RuntimeError(f"{BEFORE} {secret} {AFTER}")
    except RuntimeError:
        log.exception("operation failed")


def _log_chained_exception(log: logging.Logger, secret: str) -> None:
    try:
        try:
            raise ValueError(f"{BEFORE} {secret}")
        except ValueError as e:
            raise KeyError(f"{secret} {AFTER}") from e
    except KeyError:
        log.error("wrapped failure", exc_info=True)


PATHS: dict[str, Callable[[logging.Logger, str], None]] = {
    "percent-arg": _log_percent_arg,
    "f-string": _log_fstring,
    "repr-bytes": _log_repr_of_bytes,
    "dict-arg": _log_dict_arg,
    "extra": _log_extra,
    "exception": _log_exception,
    "chained-exception": _log_chained_exception,
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def _capture(json_format: bool, emit: Callable[[logging.Logger], None]) -> str:
    out = io.StringIO()
    setup_logging(json_format=json_format, stream=out)
    emit(logging.getLogger("keyd.test"))
    return out.getvalue()


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("json_format", [True, False], ids=["json", "text"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("secret", SECRETS, ids=[s.name for s in SECRETS])
def test_secret_never_reaches_the_log_whatever_the_path_and_format(
    secret: Secret, path: str, json_format: bool
) -> None:
    output = _capture(json_format, lambda log: PATHS[path](log, secret.text))
    for fragment in secret.must_not_appear:
        assert fragment not in output, f"{secret.name} leaked via {path}:\n{output}"
        # JSON escaping must not be a way around the check either.
        assert json.dumps(fragment)[1:-1] not in output
    assert REDACTED in output
    assert BEFORE in output and AFTER in output  # the surrounding text survives
    if json_format:
        for line in output.splitlines():
            entry = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= entry.keys()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_ts_level_logger_msg_extras_and_exception() -> None:
    def emit(log: logging.Logger) -> None:
        log.warning("rotated %s", "signing", extra={"kid": "abc", "ts": "clash"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    first, second = (json.loads(line) for line in _capture(True, emit).splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "keyd.test"
    assert first["msg"] == "rotated signing" and first["kid"] == "abc"
    assert first["extra_ts"] == "clash" and first["ts"].endswith("Z")
    assert second["msg"] == "failed" and "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_are_readable_and_a_newline_cannot_forge_a_line() -> None:
    output = _capture(False, lambda log: log.warning(
        "client %s refused", "evil\n2025-01-01T00:00:00.000Z INFO keyd: forged", extra={"n": 3}))
    assert output.count("\n") == 1
    assert " WARNING keyd.test: client evil\\n2025" in output and output.rstrip().endswith("n=3")


def test_what_operators_need_is_not_redacted() -> None:
    kid = "S_UaczuS_934lqDkhyaoga--RRE5MlcCa8MEJnUKJVA"
    text = (f"signed with kid={kid} for client svc-1 at https://as.example/token "
            "metric keyd_certificate_not_after_timestamp_seconds token_endpoint=https://x/t")
    assert redact(text) == text


@pytest.mark.usefixtures("restore_logging")
def test_extras_named_like_secrets_are_masked_whatever_their_shape() -> None:
    output = _capture(True, lambda log: log.info(
        "auth", extra={"password": "hunter2", "vault_token": "plain", "jwk": {"d": "dd"}}))
    entry = json.loads(output)
    assert entry["password"] == REDACTED and entry["vault_token"] == REDACTED
    assert entry["jwk"] == {"d": REDACTED}
    assert "hunter2" not in output and "plain" not in output


@pytest.mark.usefixtures("restore_logging")
def test_setup_twice_leaves_one_handler() -> None:
    out = io.StringIO()
    setup_logging(json_format=True, stream=out)
    setup_logging(json_format=True, stream=out)
    logging.getLogger("keyd.test").info("once")
    assert out.getvalue().count("once") == 1


def test_format_is_json_off_a_terminal_and_text_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYD_LOG_FORMAT", raising=False)
    primary, secondary = os.openpty()
    with open(secondary, "w") as tty, open(primary, "rb", buffering=0):
        assert wants_json(io.StringIO()) is True
        assert wants_json(tty) is False
        monkeypatch.setenv("KEYD_LOG_FORMAT", "json")
        assert wants_json(tty) is True
        monkeypatch.setenv("KEYD_LOG_FORMAT", "text")
        assert wants_json(io.StringIO()) is False


# Names the audit log refuses as detail keys (tests/unit/test_audit.py) and a few
# more: one definition (keyd/audit/redaction.py) decides for both.
SECRET_KEY_NAMES = ["token", "access_token", "clientSecret", "pin", "d", "qi", "payload",
                    "plaintext_b64", "password", "secret_id", "api_key", "privateKey",
                    "master_key", "x-vault-token", "authorization"]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("name", SECRET_KEY_NAMES)
def test_a_key_the_audit_log_refuses_is_masked_in_log_extras(name: str) -> None:
    from keyd.audit.redaction import clean_detail

    with pytest.raises(ValueError, match="secret material"):
        clean_detail({name: "v"})
    output = _capture(True, lambda log: log.info("auth", extra={name: "s3cr3t-value"}))
    assert "s3cr3t-value" not in output and json.loads(output)[name] == REDACTED


@pytest.mark.parametrize("name", ["access_token", "client-secret", "password", "secret_id",
                                  "api_key", "private_key", "master_key", "x-vault-token",
                                  "jwt", "payload", "cookie"])
def test_text_key_value_ending_in_a_secret_name_is_masked(name: str) -> None:
    assert redact(f"{name}=s3cr3t-value") == f"{name}={REDACTED}"
    assert redact(f'"{name}": "s3cr3t-value"') == f'"{name}": "{REDACTED}"'


def test_names_that_merely_contain_a_secret_word_elsewhere_stay_readable_in_text() -> None:
    """In text only a key *ending* in a secret word is masked: a URL named
    token_endpoint stays, as do kid and payload_hash."""
    text = "token_endpoint=https://as/t payload_hash=ab12 kid=k1 pin_count=3"
    assert redact(text) == text
