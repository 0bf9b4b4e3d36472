"""The `keyd` command as an operator uses it, on a real config and store.

Each command runs in this process through ``keyd.cli.main(argv)``, its output
read with capsys; the smoke tests at the end run the real `keyd` process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from joserfc.jwk import RSAKey

from keyd.cli import main
from tests.daemon import KEYD, cli_isolated, keyd, write_config
from tests.fixtures.jose import b64u


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    """`keyd --config CONFIG ARGS...` as ``keyd.cli.main(argv)`` in this process."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, config: Path, *args: str, check: bool = True) -> Outcome:
        self.capsys.readouterr()  # only this command's output
        with cli_isolated():
            try:
                code = main(["--config", str(config), *args])
            except SystemExit as e:  # argparse's usage errors
                assert isinstance(e.code, int), e
                code = e.code
        out, err = self.capsys.readouterr()
        if check:
            assert code == 0, f"keyd {' '.join(args)} failed ({code}): {err}"
        return Outcome(code, out, err)

    def jwks(self, config: Path) -> list[dict[str, object]]:
        keys: list[dict[str, object]] = json.loads(self(config, "jwks").stdout)["keys"]
        return keys

    def keys(self, config: Path) -> list[dict[str, object]]:
        listed: list[dict[str, object]] = json.loads(self(config, "keys", "list", "--json").stdout)
        return listed


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


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


def test_init_is_idempotent_and_makes_a_0600_master_key(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    first = cli(config, "init")
    assert "created master key" in first.stderr
    assert (tmp_path / "var" / "master.key").stat().st_mode & 0o777 == 0o600
    before = cli.keys(config)
    second = cli(config, "init")
    assert "created master key" not in second.stderr
    assert cli.keys(config) == before
    assert sorted(k["purpose"] for k in before) == ["encryption", "signing", "transport"]
    for key in before:
        assert key["state"] == "active"
        assert key["alg"] in ("PS256", "RSA-OAEP-256", None)
        assert str(key["not_after"]).endswith("Z")


def test_production_mode_issues_csrs_and_activates_on_certificate_import(
    cli: Cli, tmp_path: Path, ca: FakeCA
) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    init = cli(config, "init")
    waiting = cli.keys(config)
    assert {k["state"] for k in waiting} == {"awaiting_certificate"}
    assert all(k["provisional"] and str(k["kid"]).startswith("kv_") for k in waiting)
    for key in waiting:  # init names the next command for each key
        assert f"keyd csr {key['kid']}" in init.stderr
        assert f"keyd cert import {key['kid']}" in init.stderr
    assert cli.jwks(config) == []
    signing = next(k for k in waiting if k["purpose"] == "signing")
    csr_pem = cli(config, "csr", str(signing["kid"])).stdout
    assert "BEGIN CERTIFICATE REQUEST" in csr_pem
    chain = ca.issue(csr_pem)
    (tmp_path / "chain.pem").write_bytes(chain)
    result = cli(config, "cert", "import", str(signing["kid"]), str(tmp_path / "chain.pem"))
    assert "active" in result.stdout
    published = cli.jwks(config)
    assert len(published) == 1
    leaf_der = x509.load_pem_x509_certificates(chain)[0].public_bytes(serialization.Encoding.DER)
    assert published[0]["kid"] == b64u(hashlib.sha256(leaf_der).digest())
    assert len(published[0]["x5c"]) == 2  # type: ignore[arg-type]
    listed = next(k for k in cli.keys(config) if k["id"] == signing["id"])
    assert listed["kid"] == published[0]["kid"] and listed["state"] == "active"


def test_certificate_for_another_key_is_refused_and_changes_nothing(
    cli: Cli, tmp_path: Path, ca: FakeCA
) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    cli(config, "init")
    waiting = cli.keys(config)
    signing = next(k for k in waiting if k["purpose"] == "signing")
    encryption = next(k for k in waiting if k["purpose"] == "encryption")
    other_csr = cli(config, "csr", str(encryption["kid"])).stdout
    (tmp_path / "wrong.pem").write_bytes(ca.issue(other_csr))
    result = cli(config, "cert", "import", str(signing["kid"]), str(tmp_path / "wrong.pem"),
                  check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("keyd: error:")
    assert cli.keys(config) == waiting


def test_short_certificate_is_refused_in_production(
    cli: Cli, tmp_path: Path, ca: FakeCA
) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    cli(config, "init")
    signing = next(k for k in cli.keys(config) if k["purpose"] == "signing")
    (tmp_path / "short.pem").write_bytes(ca.issue(cli(config, "csr", str(signing["kid"])).stdout,
                                                  days=90))
    result = cli(config, "cert", "import", str(signing["kid"]), str(tmp_path / "short.pem"),
                  check=False)
    assert result.returncode == 1
    assert "12 months" in result.stderr or "365" in result.stderr


def test_assigned_kid_is_pinned_at_import(cli: Cli, tmp_path: Path, ca: FakeCA) -> None:
    config = write_config(tmp_path, {"keyd": {"mode": "production", "kid": "assigned"}})
    cli(config, "init")
    signing = next(k for k in cli.keys(config) if k["purpose"] == "signing")
    (tmp_path / "c.pem").write_bytes(ca.issue(cli(config, "csr", str(signing["kid"])).stdout))
    without = cli(config, "cert", "import", str(signing["kid"]), str(tmp_path / "c.pem"),
                   check=False)
    assert without.returncode == 1 and "--kid" in without.stderr
    cli(config, "cert", "import", str(signing["kid"]), str(tmp_path / "c.pem"),
         "--kid", "uae-directory-assigned-7f3a")
    assert [k["kid"] for k in cli.jwks(config)] == ["uae-directory-assigned-7f3a"]


@pytest.mark.parametrize("scheme", ["rfc7638", "ob-uk"])
def test_jwk_thumbprint_kid_schemes(cli: Cli, tmp_path: Path, scheme: str) -> None:
    config = write_config(tmp_path, {"keyd": {"kid": scheme}})
    cli(config, "init")
    for key in cli.jwks(config):
        members = {"e": key["e"], "kty": "RSA", "n": key["n"]}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
        if scheme == "rfc7638":
            assert key["kid"] == RSAKey.import_key(members).thumbprint()
            assert key["kid"] == b64u(hashlib.sha256(canonical).digest())
        else:
            assert key["kid"] == b64u(hashlib.sha1(canonical).digest())  # noqa: S324 - OB UK's kid
            assert len(str(key["kid"])) == 27


def test_publish_transport_adds_a_tls_key(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"keyd": {"publish_transport": True}})
    cli(config, "init")
    uses = sorted(str(k["use"]) for k in cli.jwks(config))
    assert uses == ["enc", "sig", "tls"]
    tls = next(k for k in cli.jwks(config) if k["use"] == "tls")
    assert "alg" not in tls and tls["x5c"]


def test_client_add_prints_the_token_alone_or_as_json(cli: Cli, sandbox: Path) -> None:
    config = sandbox
    token = cli(config, "client", "add", "svc-a", "--policy", "service").stdout
    assert token.count("\n") == 1 and token.startswith("keyd_")
    as_json = json.loads(cli(config, "client", "add", "svc-b", "--policy", "service",
                              "--json").stdout)
    assert as_json["name"] == "svc-b" and as_json["token"].startswith("keyd_")
    db = (config.parent / "var" / "keyd.db").read_bytes()
    assert token.strip().encode() not in db
    again = cli(config, "client", "add", "svc-a", "--policy", "service", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    unknown = cli(config, "client", "add", "svc-c", "--policy", "root", check=False)
    assert unknown.returncode == 1 and "no policy 'root'" in unknown.stderr


def test_status_lists_keys_most_urgent_first(cli: Cli, sandbox: Path) -> None:
    config = sandbox
    status = json.loads(cli(config, "status", "--json").stdout)
    assert len(status) == 3
    days = [k["days_left"] for k in status]
    assert days == sorted(days) and 390 < days[0] < 398
    text = cli(config, "status").stdout.splitlines()
    assert text[0].split() == ["PURPOSE", "STATE", "EXPIRES", "KID"]
    # Dates, not bare floats: RFC 3339 and how far away, e.g. "2027-01-01T00:00:00Z (in 397 d)".
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in 39[0-7] d\)", text[1]), text


def test_audit_records_admin_actions_and_its_chain_verifies(cli: Cli, sandbox: Path) -> None:
    config = sandbox
    cli(config, "client", "add", "svc-audited", "--policy", "service")
    events = json.loads(cli(config, "audit", "--json").stdout)  # one JSON document
    assert [e["action"] for e in events].count("key.create") == 3
    assert any(e["action"] == "client.add" for e in events)
    assert "intact" in cli(config, "audit", "verify").stdout
    table = cli(config, "audit", "list").stdout.splitlines()
    assert table[0].split() == ["SEQ", "AT", "ACTOR", "ACTION", "OUTCOME", "KID"]
    assert len(table) == len(events) + 1
    # Aligned: every column after SEQ (right-aligned, 3 wide here) starts at
    # the same offset on every line.
    starts = {tuple(m.start() for m in re.finditer(r"(?<=  )\S", line) if m.start() > 3)
              for line in table}
    assert len(starts) == 1, table


def test_rotate_status_and_keys_list_say_when_a_pending_key_starts_signing(
    cli: Cli, tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {})
    cli(config, "init")
    rotated = cli(config, "rotate", "signing").stdout
    match = re.search(r"is pending; published now, it starts signing at (\S+Z) \(in (\d+) d\)",
                      rotated)
    assert match, rotated
    assert match.group(2) in ("1", "2")  # prepublish 2d, just under two whole days
    pending = next(k for k in cli.keys(config) if k["state"] == "pending")
    assert str(pending["activates_at"]).startswith(match.group(1).removesuffix("Z"))
    assert all("activates_at" not in k for k in cli.keys(config) if k["state"] != "pending")
    assert f"starts signing {match.group(1)}" in cli(config, "status").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["csr", "no-such-kid"], "no key with kid or id"),
        (["cert", "import", "no-such-kid", "/nonexistent.pem"], "cannot read"),
        (["keys", "list", "--bogus"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_commands_fail_with_one_line(
    cli: Cli, sandbox: Path, args: list[str], message: str
) -> None:
    result = cli(sandbox, *args, check=False)
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
    cli: Cli, tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(content)
    result = cli(config, "init", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_missing_config_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    result = cli(tmp_path / "absent.toml", "keys", "list", check=False)
    assert result.returncode == 1
    assert result.stderr == f"keyd: error: config file {tmp_path / 'absent.toml'} not found\n"


def test_in_process_main_leaves_the_process_as_it_found_it(cli: Cli, sandbox: Path) -> None:
    """Logging, umask, environment and threads are as before: the tests stay independent."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("alembic").level,
              dict(os.environ), set(threading.enumerate()))
    umask = os.umask(0o022)
    os.umask(umask)
    cli(sandbox, "status")
    cli(sandbox, "keys", "list", "--bogus", check=False)
    after = (list(root.handlers), root.level, logging.getLogger("alembic").level,
             dict(os.environ), set(threading.enumerate()))
    assert after == before
    assert os.umask(umask) == umask


# The real process, as an operator starts it: the entry point, exit codes, one-line errors.
KEYD_SCRIPT = Path(sys.executable).parent / "keyd"


@pytest.mark.slow
def test_installed_keyd_prints_help_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run([str(KEYD_SCRIPT), "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: keyd") and "serve" in result.stdout


@pytest.mark.slow
def test_a_failing_process_exits_1_or_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    missing = keyd(tmp_path / "absent.toml", "status", check=False, process=True)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"keyd: error: config file {tmp_path / 'absent.toml'} not found\n"
    usage = subprocess.run([*KEYD, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    assert "invalid choice" in usage.stderr and "Traceback" not in usage.stderr


@pytest.mark.slow
def test_init_then_status_as_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    init = keyd(config, "init", process=True)
    assert "created master key" in init.stderr
    assert (tmp_path / "var" / "master.key").stat().st_mode & 0o777 == 0o600
    status = keyd(config, "status", process=True).stdout.splitlines()
    assert status[0].split() == ["PURPOSE", "STATE", "EXPIRES", "KID"]
    assert sorted(line.split()[0] for line in status[1:]) == ["encryption", "signing",
                                                              "transport"]
