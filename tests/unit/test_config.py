"""config.toml is read strictly, in process: every ConfigError the reader (and
each backend plugin's own table reader) can raise is provoked here, and its
message names the key and the value at fault.

The CLI's exit code and one-line output for a bad config are tested once, in
tests/unit/test_cli.py (a subprocess); everything else needs no process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyd import backends, config
from keyd.config import Secret, read_secret
from keyd.errors import ConfigError
from keyd.model import Purpose

WHERE = Path("/etc/keyd/config.toml")
MINIMAL: dict[str, Any] = {"keyd": {"client_id": "c", "organisation": "o"}}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, table by table."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def read(extra: dict[str, Any]) -> config.Settings:
    return config.from_dict(merged(MINIMAL, extra), WHERE)


def error_of(extra: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as raised:
        read(extra)
    return raised.value.detail


ISSUER = {"jwks_uri": "https://paynet.example/jwks"}

# (what config.toml says, the whole message keyd answers): one row per raise site.
CASES: list[tuple[str, dict[str, Any], str]] = [
    # --- the table primitives (keyd/config/table.py)
    ("duration", {"scheduler": {"interval": "1 minute"}},
     "[scheduler] interval: '1 minute' is not a duration like \"90s\", \"15m\", \"7d\""),
    ("not a table", {"public": 8080}, "[public] must be a table"),
    ("not a string", {"keyd": {"client_id": 7}}, "[keyd] client_id must be a string, not 7"),
    ("not an integer", {"public": {"max_age": "300"}},
     "[public] max_age must be an integer, not '300'"),
    ("a bool is not an integer", {"api": {"max_body": True}},
     "[api] max_body must be an integer, not True"),
    ("not a flag", {"keyd": {"throwaway": "yes"}},
     "[keyd] throwaway must be true or false, not 'yes'"),
    ("not a list of strings", {"alerts": {"thresholds": "7d"}},
     "[alerts] thresholds must be a list of strings, not '7d'"),
    ("unknown key", {"store": {"uri": "sqlite://"}},
     "[store] has unknown key 'uri'; did you mean `url`?"),
    # --- [keyd]
    ("mode", {"keyd": {"mode": "prod"}}, "[keyd] mode: 'prod' is not sandbox or production"),
    ("kid", {"keyd": {"kid": "sha1"}},
     "[keyd] kid: 'sha1' is not x5t#S256, rfc7638, ob-uk or assigned"),
    ("client_id", {"keyd": {"client_id": ""}},
     "[keyd] client_id must be set (the platform-issued OIDC client_id)"),
    ("organisation", {"keyd": {"organisation": ""}},
     "[keyd] organisation must be set (the certificate subject O)"),
    ("country", {"keyd": {"country": "MYS"}}, "[keyd] country: 'MYS' is not a 2-letter ISO code"),
    # --- [public] and [api]
    ("listen", {"public": {"listen": "8080"}}, "[public] listen: '8080' is not HOST:PORT"),
    ("port range", {"public": {"listen": "127.0.0.1:65536"}},
     "[public] listen: '127.0.0.1:65536' is not HOST:PORT"),
    ("loopback", {"api": {"listen": "0.0.0.0:8081"}},
     "[api] listen: the local API listens on loopback only, not '0.0.0.0'"),
    ("workers", {"api": {"workers": 0}},
     "[api] workers must be \"auto\" or an integer from 1 to 256, not 0"),
    ("no way in", {"api": {"listen": "", "socket": ""}},
     "[api] needs a listen address, a socket, or both"),
    # --- [backend] and each plugin's own table
    ("kind", {"backend": {"kind": "hsm"}}, "[backend] kind: 'hsm' is not local, vault or pkcs11"),
    ("local table", {"backend": {"local": {"master_key": "x"}}},
     "[backend.local] has unknown key 'master_key'; did you mean `master_key_file`?"),
    ("vault auth", {"backend": {"kind": "vault", "vault": {"auth": "ldap"}}},
     "[backend.vault] auth: 'ldap' is not token or approle"),
    ("pkcs11 oaep", {"backend": {"kind": "pkcs11", "pkcs11": {"oaep_sha256": "soft"}}},
     "[backend.pkcs11] oaep_sha256: 'soft' is not auto, token or raw"),
    ("vault mount", {"backend": {"kind": "vault", "vault": {"mount": "../sys"}}},
     "[backend.vault] mount: '../sys' is not a mount path"),
    ("vault key_prefix", {"backend": {"kind": "vault", "vault": {"key_prefix": "k/"}}},
     "[backend.vault] key_prefix: 'k/' may hold only letters, digits, '_', '-' and '.'"),
    ("vault role_id", {"backend": {"kind": "vault", "vault": {"auth": "approle"}}},
     "[backend.vault] role_id is required when auth = \"approle\""),
    ("pkcs11 sessions", {"backend": {"kind": "pkcs11", "pkcs11": {"sessions": 0}}},
     "[backend.pkcs11] sessions: 0 must be at least 1"),
    # A table of a kind not in use is still checked by its plugin.
    ("idle kind's table", {"backend": {"kind": "local", "vault": {"mout": "transit"}}},
     "[backend.vault] has unknown key 'mout'; did you mean `mount`?"),
    # --- [lifecycle.<purpose>]
    ("key_size", {"lifecycle": {"signing": {"key_size": 1024}}},
     "[lifecycle.signing] key_size: 1024 is not 2048, 3072 or 4096"),
    ("max_published", {"lifecycle": {"signing": {"max_published": 1}}},
     "[lifecycle.signing] max_published must be at least 2 (old and new key), not 1"),
    ("exportable purpose", {"lifecycle": {"signing": {"exportable": True}}},
     "[lifecycle.signing] exportable: only the transport key may be exportable"),
    ("exportable on an HSM",
     {"backend": {"kind": "pkcs11"}, "lifecycle": {"transport": {"exportable": True}}},
     "[lifecycle.transport] exportable: keys on the pkcs11 backend are never exportable; "
     "set it to false"),
    ("validity", {"lifecycle": {"signing": {"validity": "90d"}}},
     "[lifecycle.signing] validity: 90 days is under the platform's 12 months; set [keyd] "
     "throwaway = true only for a disposable test store"),
    ("rotate_after", {"lifecycle": {"signing": {"rotate_after": "0s"}}},
     "[lifecycle.signing] rotate_after must be longer than 0s, not 0:00:00"),
    ("past expiry", {"lifecycle": {"encryption": {"rotate_after": "396d"}}},
     "[lifecycle.encryption]: rotate_after + prepublish (396d + 2d) exceeds validity (397d): "
     "a key would sign past its certificate's expiry"),
    ("all disabled", {"lifecycle": {p.value: {"enabled": False} for p in Purpose}},
     "[lifecycle] every purpose is disabled; enable at least one"),
    # --- [alerts]
    ("webhook url", {"alerts": {"webhook": {"url": "http://hooks.example/x"}}},
     "[alerts.webhook] url: 'http://hooks.example/x' must be https (or http to a loopback host)"),
    ("webhook limits", {"alerts": {"webhook": {"url": "https://h.example/", "retries": 11}}},
     "[alerts.webhook]: timeout must be 1-60 s and retries 0-10, not 5 s and 11"),
    ("smtp needs", {"alerts": {"smtp": {"host": "smtp.example", "from": "keyd@example"}}},
     "[alerts.smtp] needs host, from and at least one address in to"),
    ("smtp port", {"alerts": {"smtp": {"host": "smtp.example", "from": "k@example",
                                       "to": ["ops@example"], "port": 0}}},
     "[alerts.smtp] port: 0 is not a port"),
    # --- [scheduler]
    ("interval", {"scheduler": {"interval": "0s"}},
     "[scheduler] interval must be at least 1s, not 0:00:00"),
    ("lease", {"scheduler": {"lease": "0s"}}, "[scheduler] lease must be at least 1s, not 0:00:00"),
    ("renew_interval", {"scheduler": {"renew_interval": "0s"}},
     "[scheduler] renew_interval must be at least 1s, not 0:00:00"),
    # --- [issuers.<name>]
    ("jwks_uri", {"issuers": {"p": {"jwks_uri": "http://paynet.example/jwks"}}},
     "[issuers.p] jwks_uri: 'http://paynet.example/jwks' must be https (or http to a "
     "loopback host)"),
    ("algorithms", {"issuers": {"p": {**ISSUER, "algorithms": ["RS256"]}}},
     "[issuers.p] algorithms: RS256 not allowed; use ES256, ES384, ES512, PS256, PS384 or PS512"),
    ("no algorithms", {"issuers": {"p": {**ISSUER, "algorithms": []}}},
     "[issuers.p] algorithms: an empty list not allowed; use ES256, ES384, ES512, PS256, "
     "PS384 or PS512"),
    ("link prefix", {"issuers": {"p": {**ISSUER, "link_prefixes": ["https://dp.example.my"]}}},
     "[issuers.p] link_prefixes: 'https://dp.example.my' must be a URL whose path ends in '/' "
     "(like \"https://dp.example.my/ofm/\")"),
    ("require", {"issuers": {"p": {**ISSUER, "require": ["exp"]}}},
     "[issuers.p] require: ['exp'] cannot be required; choose from "
     "['crit', 'cty', 'iat', 'iss', 'jti', 'typ']"),
    ("require iss", {"issuers": {"p": {**ISSUER, "require": ["iss"]}}},
     "[issuers.p] require names iss: set [issuers.p] iss too"),
    ("leeway", {"issuers": {"p": {**ISSUER, "leeway": "6m"}}},
     "[issuers.p] leeway must be at most 5m, not 0:06:00"),
    ("fetch_timeout", {"issuers": {"p": {**ISSUER, "fetch_timeout": 6}}},
     "[issuers.p] fetch_timeout must be between 1 and 5 seconds, not 6"),
]


@pytest.mark.parametrize(("extra", "message"), [(e, m) for _, e, m in CASES],
                         ids=[name for name, _, _ in CASES])
def test_each_config_error_names_the_key_and_the_value(extra: dict[str, Any], message: str) -> None:
    assert error_of(extra) == message


def test_a_minimal_config_reads_with_the_documented_defaults() -> None:
    """Only client_id and organisation are required; the rest has defaults."""
    settings = read({})
    assert settings.backend.kind == "local"
    assert settings.backend.options_as(config.LocalBackendSettings).master_key_file == Path(
        "/etc/keyd/var/master.key")
    assert str(settings.public.listen) == "127.0.0.1:8080"
    assert settings.lifecycle[Purpose.SIGNING].rotate_after == timedelta(days=90)
    assert settings.store.url == "sqlite:////etc/keyd/var/keyd.db"


def test_the_backends_capabilities_set_the_defaults_that_depend_on_it() -> None:
    """The transport key is exportable by default where the backend can export
    keys, and "auto" runs one worker where the backend wants one process."""
    for kind in backends.KINDS:
        capabilities = backends.plugin(kind).capabilities
        settings = read({"backend": {"kind": kind}})
        assert settings.lifecycle[Purpose.TRANSPORT].exportable is capabilities.exports_private_keys
        if capabilities.one_process:
            assert settings.api.workers == 1
        else:
            assert settings.api.workers == max(1, len(os.sched_getaffinity(0)))


def test_only_the_chosen_backends_settings_are_kept() -> None:
    """[backend.vault] is read into VaultBackendSettings when vault is chosen;
    asking a backend's settings as another kind's type is a programming error."""
    settings = read({"backend": {"kind": "vault", "vault": {"mount": "kv", "timeout": 3}}})
    vault = settings.backend.options_as(config.VaultBackendSettings)
    assert (vault.mount, vault.timeout) == ("kv", 3.0)
    with pytest.raises(TypeError, match="VaultBackendSettings, not LocalBackendSettings"):
        settings.backend.options_as(config.LocalBackendSettings)


def test_relative_secret_paths_resolve_against_the_config_folder() -> None:
    settings = read({"backend": {"kind": "pkcs11", "pkcs11": {"pin_file": "pin"}}})
    assert settings.backend.options_as(config.Pkcs11BackendSettings).pin_file == Path(
        "/etc/keyd/pin")


class TestLoad:
    """load() turns every way a file can be unreadable into one ConfigError naming it."""

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=f"^config file {tmp_path}/none.toml not found$"):
            config.load(tmp_path / "none.toml")

    def test_unreadable_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=f"^config file {tmp_path} cannot be read: "):
            config.load(tmp_path)  # a directory

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "config.toml"
        path.write_bytes(b"[keyd]\nclient_id = \"\xff\"\n")
        with pytest.raises(ConfigError, match=f"^config file {path} cannot be read: .*utf-8"):
            config.load(path)

    def test_not_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "config.toml"
        path.write_text("[keyd\n")
        with pytest.raises(ConfigError, match=f"^config file {path} is not valid TOML: "):
            config.load(path)

    def test_keyd_config_names_the_file_when_no_path_is_given(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "chosen.toml"
        path.write_text('[keyd]\nclient_id = "c"\norganisation = "o"\n')
        monkeypatch.setenv("KEYD_CONFIG", str(path))
        assert config.load().path == path.resolve()


class TestSecrets:
    def test_a_secret_never_shows_its_value(self) -> None:
        secret = Secret(b"hunter2", "file /etc/keyd/pin")
        assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
        assert secret.reveal() == b"hunter2" and "file /etc/keyd/pin" in repr(secret)

    def test_file_then_environment_then_systemd_credential(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "pin").write_text("from-file\n")
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "pkcs11-pin").write_text("from-credential\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
        monkeypatch.setenv("KEYD_TEST_PIN", "from-env")

        def reveal(file: Path | None) -> bytes | None:
            found = read_secret(file, "KEYD_TEST_PIN", "pkcs11-pin")
            return None if found is None else found.reveal()

        assert reveal(tmp_path / "pin") == b"from-file"
        assert reveal(tmp_path / "missing") == b"from-env"
        monkeypatch.delenv("KEYD_TEST_PIN")
        assert reveal(None) == b"from-credential"
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        assert reveal(None) is None


def test_an_ipv6_listen_address_prints_as_config_toml_wrote_it() -> None:
    """Log lines and errors name "[::1]:8443", not the ambiguous "::1:8443"."""
    from keyd.config import Listen

    assert str(Listen("::1", 8443)) == "[::1]:8443"
    assert str(Listen("127.0.0.1", 8443)) == "127.0.0.1:8443"
