"""The `keyd` command as an operator uses it: a real process, a real config."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from joserfc.jwk import RSAKey

from tests.daemon import keyd, write_config
from tests.fixtures.jose import b64u


def jwks(config: Path) -> list[dict[str, object]]:
    keys: list[dict[str, object]] = json.loads(keyd(config, "jwks").stdout)["keys"]
    return keys


def keys_list(config: Path) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = json.loads(keyd(config, "keys", "list", "--json").stdout)
    return listed


class FakeCA:
    """A CA of our own, standing in for the platform's."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Open Finance CA")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, csr_pem: str, days: int = 397) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        now = datetime.now(UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(csr.subject).issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return (leaf.public_bytes(serialization.Encoding.PEM)
                + self.cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def ca() -> FakeCA:
    return FakeCA()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised sandbox store shared by the tests that only read it."""
    config = write_config(tmp_path_factory.mktemp("sandbox"), {})
    keyd(config, "init")
    return config


def test_init_is_idempotent_and_makes_a_0600_master_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    first = keyd(config, "init")
    assert "created master key" in first.stderr
    assert (tmp_path / "var" / "master.key").stat().st_mode & 0o777 == 0o600
    before = keys_list(config)
    second = keyd(config, "init")
    assert "created master key" not in second.stderr
    assert keys_list(config) == before
    assert sorted(k["purpose"] for k in before) == ["encryption", "signing", "transport"]
    for key in before:
        assert key["state"] == "active"
        assert key["alg"] in ("PS256", "RSA-OAEP-256", None)
        assert str(key["not_after"]).endswith("Z")


def test_production_mode_issues_csrs_and_activates_on_certificate_import(
    tmp_path: Path, ca: FakeCA
) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    init = keyd(config, "init")
    waiting = keys_list(config)
    assert {k["state"] for k in waiting} == {"awaiting_certificate"}
    assert all(k["provisional"] and str(k["kid"]).startswith("kv_") for k in waiting)
    for key in waiting:  # init names the next command for each key
        assert f"keyd csr {key['kid']}" in init.stderr
        assert f"keyd cert import {key['kid']}" in init.stderr
    assert jwks(config) == []
    signing = next(k for k in waiting if k["purpose"] == "signing")
    csr_pem = keyd(config, "csr", str(signing["kid"])).stdout
    assert "BEGIN CERTIFICATE REQUEST" in csr_pem
    chain = ca.issue(csr_pem)
    (tmp_path / "chain.pem").write_bytes(chain)
    result = keyd(config, "cert", "import", str(signing["kid"]), str(tmp_path / "chain.pem"))
    assert "active" in result.stdout
    published = jwks(config)
    assert len(published) == 1
    leaf_der = x509.load_pem_x509_certificates(chain)[0].public_bytes(serialization.Encoding.DER)
    assert published[0]["kid"] == b64u(hashlib.sha256(leaf_der).digest())
    assert len(published[0]["x5c"]) == 2  # type: ignore[arg-type]
    listed = next(k for k in keys_list(config) if k["id"] == signing["id"])
    assert listed["kid"] == published[0]["kid"] and listed["state"] == "active"


def test_certificate_for_another_key_is_refused_and_changes_nothing(
    tmp_path: Path, ca: FakeCA
) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    keyd(config, "init")
    waiting = keys_list(config)
    signing = next(k for k in waiting if k["purpose"] == "signing")
    encryption = next(k for k in waiting if k["purpose"] == "encryption")
    other_csr = keyd(config, "csr", str(encryption["kid"])).stdout
    (tmp_path / "wrong.pem").write_bytes(ca.issue(other_csr))
    result = keyd(config, "cert", "import", str(signing["kid"]), str(tmp_path / "wrong.pem"),
                  check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("keyd: error:")
    assert keys_list(config) == waiting


def test_short_certificate_is_refused_in_production(tmp_path: Path, ca: FakeCA) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    keyd(config, "init")
    signing = next(k for k in keys_list(config) if k["purpose"] == "signing")
    (tmp_path / "short.pem").write_bytes(ca.issue(keyd(config, "csr", str(signing["kid"])).stdout,
                                                  days=90))
    result = keyd(config, "cert", "import", str(signing["kid"]), str(tmp_path / "short.pem"),
                  check=False)
    assert result.returncode == 1
    assert "12 months" in result.stderr or "365" in result.stderr


def test_assigned_kid_is_pinned_at_import(tmp_path: Path, ca: FakeCA) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production", "kid": "assigned"}})
    keyd(config, "init")
    signing = next(k for k in keys_list(config) if k["purpose"] == "signing")
    (tmp_path / "c.pem").write_bytes(ca.issue(keyd(config, "csr", str(signing["kid"])).stdout))
    without = keyd(config, "cert", "import", str(signing["kid"]), str(tmp_path / "c.pem"),
                   check=False)
    assert without.returncode == 1 and "--kid" in without.stderr
    keyd(config, "cert", "import", str(signing["kid"]), str(tmp_path / "c.pem"),
         "--kid", "uae-directory-assigned-7f3a")
    assert [k["kid"] for k in jwks(config)] == ["uae-directory-assigned-7f3a"]


@pytest.mark.parametrize("scheme", ["rfc7638", "ob-uk"])
def test_jwk_thumbprint_kid_schemes(tmp_path: Path, scheme: str) -> None:
    config = write_config(tmp_path, {"keyd": {"kid": scheme}})
    keyd(config, "init")
    for key in jwks(config):
        members = {"e": key["e"], "kty": "RSA", "n": key["n"]}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
        if scheme == "rfc7638":
            assert key["kid"] == RSAKey.import_key(members).thumbprint()
            assert key["kid"] == b64u(hashlib.sha256(canonical).digest())
        else:
            assert key["kid"] == b64u(hashlib.sha1(canonical).digest())  # noqa: S324 - OB UK's kid
            assert len(str(key["kid"])) == 27


def test_publish_transport_adds_a_tls_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"keyd": {"publish_transport": True}})
    keyd(config, "init")
    uses = sorted(str(k["use"]) for k in jwks(config))
    assert uses == ["enc", "sig", "tls"]
    tls = next(k for k in jwks(config) if k["use"] == "tls")
    assert "alg" not in tls and tls["x5c"]


def test_client_add_prints_the_token_alone_or_as_json(sandbox: Path) -> None:
    config = sandbox
    token = keyd(config, "client", "add", "svc-a", "--policy", "service").stdout
    assert token.count("\n") == 1 and token.startswith("keyd_")
    as_json = json.loads(keyd(config, "client", "add", "svc-b", "--policy", "service",
                              "--json").stdout)
    assert as_json["name"] == "svc-b" and as_json["token"].startswith("keyd_")
    db = (config.parent / "var" / "keyd.db").read_bytes()
    assert token.strip().encode() not in db
    again = keyd(config, "client", "add", "svc-a", "--policy", "service", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    unknown = keyd(config, "client", "add", "svc-c", "--policy", "root", check=False)
    assert unknown.returncode == 1 and "no policy 'root'" in unknown.stderr


def test_status_lists_keys_most_urgent_first(sandbox: Path) -> None:
    config = sandbox
    status = json.loads(keyd(config, "status", "--json").stdout)
    assert len(status) == 3
    days = [k["days_left"] for k in status]
    assert days == sorted(days) and 390 < days[0] < 398
    text = keyd(config, "status").stdout.splitlines()
    assert text[0].split() == ["PURPOSE", "STATE", "EXPIRES", "KID"]
    # Dates, not bare floats: RFC 3339 and how far away, e.g. "2027-01-01T00:00:00Z (in 397 d)".
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in 39[0-7] d\)", text[1]), text


def test_audit_records_admin_actions_and_its_chain_verifies(sandbox: Path) -> None:
    config = sandbox
    keyd(config, "client", "add", "svc-audited", "--policy", "service")
    events = json.loads(keyd(config, "audit", "--json").stdout)  # one JSON document
    assert [e["action"] for e in events].count("key.create") == 3
    assert any(e["action"] == "client.add" for e in events)
    assert "intact" in keyd(config, "audit", "verify").stdout
    table = keyd(config, "audit", "list").stdout.splitlines()
    assert table[0].split() == ["SEQ", "AT", "ACTOR", "ACTION", "OUTCOME", "KID"]
    assert len(table) == len(events) + 1
    # Aligned: every column after SEQ (right-aligned, 3 wide here) starts at
    # the same offset on every line.
    starts = {tuple(m.start() for m in re.finditer(r"(?<=  )\S", line) if m.start() > 3)
              for line in table}
    assert len(starts) == 1, table


def test_rotate_status_and_keys_list_say_when_a_pending_key_starts_signing(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {})
    keyd(config, "init")
    rotated = keyd(config, "rotate", "signing").stdout
    match = re.search(r"is pending; published now, it starts signing at (\S+Z) \(in (\d+) d\)",
                      rotated)
    assert match, rotated
    assert match.group(2) in ("1", "2")  # prepublish 2d, just under two whole days
    pending = next(k for k in keys_list(config) if k["state"] == "pending")
    assert str(pending["activates_at"]).startswith(match.group(1).removesuffix("Z"))
    assert all("activates_at" not in k for k in keys_list(config) if k["state"] != "pending")
    assert f"starts signing {match.group(1)}" in keyd(config, "status").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["csr", "no-such-kid"], "no key with kid or id"),
        (["cert", "import", "no-such-kid", "/nonexistent.pem"], "cannot read"),
        (["keys", "list", "--bogus"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_commands_fail_with_one_line(sandbox: Path, args: list[str], message: str) -> None:
    result = keyd(sandbox, *args, check=False)
    assert result.returncode in (1, 2)
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("[keyd\n", "not valid TOML"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\nmode = "prod"\n', "mode"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\n[lifecycle.signing]\nkey_size = 1024\n',
         "key_size"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\n[lifecycle.signing]\nvalidity = "90d"\n',
         "12 months"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\ncolour = "blue"\n', "unknown key"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\n[api]\nlisten = "0.0.0.0:8081"\n',
         "loopback"),
        ('[keyd]\nclient_id = "x"\norganisation = "o"\n[issuers.paynet]\n'
         'jwks_uri = "http://paynet.example/jwks"\n', "https"),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(content)
    result = keyd(config, "init", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = keyd(tmp_path / "absent.toml", "keys", "list", check=False)
    assert result.returncode == 1
    assert result.stderr == f"keyd: error: config file {tmp_path / 'absent.toml'} not found\n"
