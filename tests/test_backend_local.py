"""The embedded local backend: the shared contract, plus what is at rest on disk."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from keyd.backends.base import Capabilities
from keyd.backends.local import (
    LocalBackend,
    create_master_key_file,
    from_settings,
    resolve_master_key,
)
from keyd.config import LocalBackendSettings, Settings, from_dict
from keyd.errors import BackendError, ConfigError, KeyNotFound
from keyd.model import OaepHash, Purpose, SignScheme
from tests.backend_contract import BackendContract, oaep_encrypt, strict_pss_verify
from tests.fixtures.jose import b64u as b64url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def settings_for(tmp_path: Path) -> Settings:
    raw = {"keyd": {"client_id": "client-1", "organisation": "Example Bhd", "data_dir": "var"}}
    return from_dict(raw, tmp_path / "config.toml")


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys"


@pytest.fixture
def no_env_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution tests must not see a master key from the runner's environment."""
    monkeypatch.delenv("KEYD_MASTER_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


class TestLocalBackendContract(BackendContract):
    @pytest.fixture
    def backend(self, keys_dir: Path, master_key: bytes) -> Iterator[LocalBackend]:
        backend = LocalBackend(keys_dir, master_key)
        yield backend
        backend.close()


class TestNarrowedLocalBackendContract(BackendContract):
    """The contract follows Capabilities: the same backend declaring less (no
    RSA-OAEP, no export) must refuse exactly that with Unsupported, and pass."""

    @pytest.fixture
    def backend(self, keys_dir: Path, master_key: bytes) -> Iterator[LocalBackend]:
        backend = LocalBackend(keys_dir, master_key)
        backend.capabilities = Capabilities(
            oaep_hashes=frozenset({OaepHash.SHA256}), exports_private_keys=False, name="narrow")
        yield backend
        backend.close()


# ------------------------------------------------------------------ at rest


def test_keys_dir_is_0700_and_key_files_are_0600(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    key = backend.generate(Purpose.SIGNING, 2048)
    assert mode(keys_dir) == 0o700
    files = list(keys_dir.iterdir())
    assert [f.name for f in files] == [f"{key.ref}.key"]
    assert mode(files[0]) == 0o600


def test_existing_loose_keys_dir_is_tightened_to_0700(keys_dir: Path, master_key: bytes) -> None:
    keys_dir.mkdir(parents=True, mode=0o755)
    keys_dir.chmod(0o755)
    LocalBackend(keys_dir, master_key).check()
    assert mode(keys_dir) == 0o700


def test_private_key_is_not_on_disk_in_clear(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    key = backend.generate(Purpose.TRANSPORT, 2048, exportable=True)
    pem = backend.export_private_key_pem(key.ref)
    private = serialization.load_pem_private_key(pem, None)
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    on_disk = (keys_dir / f"{key.ref}.key").read_bytes()
    assert der[-64:] not in on_disk
    assert b64url(der)[-64:].encode() not in on_disk
    assert base64.b64encode(der)[-64:] not in on_disk
    assert b"PRIVATE KEY" not in on_disk
    assert master_key not in on_disk and b64url(master_key).encode() not in on_disk


def test_envelope_records_version_and_exportability(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    key = backend.generate(Purpose.ENCRYPTION, 2048)
    envelope = json.loads((keys_dir / f"{key.ref}.key").read_text())
    assert envelope["v"] == 1
    assert envelope["ref"] == key.ref
    assert envelope["exportable"] is False


def test_restart_finds_keys_and_they_still_work(keys_dir: Path, master_key: bytes) -> None:
    first = LocalBackend(keys_dir, master_key)
    sig = first.generate(Purpose.SIGNING, 2048)
    enc = first.generate(Purpose.ENCRYPTION, 2048)
    first.close()

    second = LocalBackend(keys_dir, master_key)
    second.check()
    assert sorted(second.list_refs()) == sorted([sig.ref, enc.ref])
    signature = second.sign(sig.ref, b"after restart", SignScheme.PSS_SHA256)
    strict_pss_verify(sig.public_key, signature, b"after restart")
    ct = oaep_encrypt(enc.public_key, b"k" * 32, OaepHash.SHA256)
    assert second.decrypt(enc.ref, ct, OaepHash.SHA256) == b"k" * 32


def test_wrong_master_key_is_backend_error_naming_the_ref(
    keys_dir: Path, master_key: bytes
) -> None:
    key = LocalBackend(keys_dir, master_key).generate(Purpose.SIGNING, 2048)
    wrong = LocalBackend(keys_dir, os.urandom(32))
    with pytest.raises(BackendError, match=key.ref):
        wrong.sign(key.ref, b"x", SignScheme.PSS_SHA256)
    with pytest.raises(BackendError, match="wrong master key"):
        wrong.check()


def test_wrong_master_key_at_start_up_says_what_to_check_and_how_to_restore(
    keys_dir: Path, master_key: bytes
) -> None:
    LocalBackend(keys_dir, master_key).generate(Purpose.SIGNING, 2048)
    wrong = LocalBackend(keys_dir, os.urandom(32), "$KEYD_MASTER_KEY")
    with pytest.raises(BackendError) as raised:
        wrong.check()
    message = str(raised.value.detail)
    assert "from $KEYD_MASTER_KEY does not open" in message
    assert "`keyd init` made for this data_dir" in message
    assert "restore the backup to $KEYD_MASTER_KEY" in message
    assert "\n" not in message


def test_tampered_file_is_backend_error(keys_dir: Path, master_key: bytes) -> None:
    key = LocalBackend(keys_dir, master_key).generate(Purpose.SIGNING, 2048)
    path = keys_dir / f"{key.ref}.key"
    envelope = json.loads(path.read_text())
    blob = bytearray(base64.urlsafe_b64decode(envelope["private_key"] + "=="))
    blob[40] ^= 1
    envelope["private_key"] = b64url(bytes(blob))
    path.write_text(json.dumps(envelope))
    with pytest.raises(BackendError, match=f"{key.ref}.*tampered"):
        LocalBackend(keys_dir, master_key).sign(key.ref, b"x", SignScheme.PSS_SHA256)


def test_flipping_the_exportable_flag_is_backend_error(keys_dir: Path, master_key: bytes) -> None:
    """The flag is authenticated: editing it cannot make a signing key exportable."""
    key = LocalBackend(keys_dir, master_key).generate(Purpose.TRANSPORT, 2048)
    path = keys_dir / f"{key.ref}.key"
    envelope = json.loads(path.read_text())
    envelope["exportable"] = True
    path.write_text(json.dumps(envelope))
    with pytest.raises(BackendError, match=key.ref):
        LocalBackend(keys_dir, master_key).export_private_key_pem(key.ref)


@pytest.mark.parametrize("garbage", [b"", b"not json", b"[]", b'{"v": 99}', b'{"v": 1}'])
def test_garbage_key_file_is_backend_error(
    keys_dir: Path, master_key: bytes, garbage: bytes
) -> None:
    key = LocalBackend(keys_dir, master_key).generate(Purpose.SIGNING, 2048)
    (keys_dir / f"{key.ref}.key").write_bytes(garbage)
    with pytest.raises(BackendError, match=key.ref) as caught:
        LocalBackend(keys_dir, master_key).public_key(key.ref)
    assert not isinstance(caught.value, KeyNotFound)


def test_files_swapped_between_refs_are_backend_error(keys_dir: Path, master_key: bytes) -> None:
    first = LocalBackend(keys_dir, master_key)
    a = first.generate(Purpose.SIGNING, 2048)
    b = first.generate(Purpose.SIGNING, 2048)
    path_a, path_b = keys_dir / f"{a.ref}.key", keys_dir / f"{b.ref}.key"
    content_a, content_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(content_b)
    path_b.write_bytes(content_a)
    second = LocalBackend(keys_dir, master_key)
    for ref in (a.ref, b.ref):
        with pytest.raises(BackendError, match=ref):
            second.sign(ref, b"x", SignScheme.PSS_SHA256)


def test_destroy_removes_the_file(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    key = backend.generate(Purpose.SIGNING, 2048)
    backend.destroy(key.ref)
    assert list(keys_dir.iterdir()) == []
    with pytest.raises(KeyNotFound):
        LocalBackend(keys_dir, master_key).public_key(key.ref)


def test_hostile_refs_never_touch_the_filesystem(
    tmp_path: Path, keys_dir: Path, master_key: bytes
) -> None:
    backend = LocalBackend(keys_dir, master_key)
    outside = tmp_path / "data" / "victim.key"
    outside.write_text("do not touch")
    for ref in ("../victim", "local-../../x", "local-0123456789abcdef\n", "", "\0", "a" * 10_000):
        with pytest.raises(KeyNotFound):
            backend.public_key(ref)
        backend.destroy(ref)
    assert outside.read_text() == "do not touch"


def test_refused_generate_requests(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    for size in (1024, 2047, 8192):
        with pytest.raises(BackendError, match=str(size)):
            backend.generate(Purpose.SIGNING, size)
    for purpose in (Purpose.SIGNING, Purpose.ENCRYPTION):
        with pytest.raises(BackendError, match="exportable"):
            backend.generate(purpose, 2048, exportable=True)
    assert backend.list_refs() == []


def test_non_exportable_transport_key_refuses_export(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    key = backend.generate(Purpose.TRANSPORT, 2048, exportable=False)
    with pytest.raises(BackendError, match="not exportable"):
        backend.export_private_key_pem(key.ref)


def test_master_key_must_be_32_bytes(keys_dir: Path) -> None:
    with pytest.raises(ConfigError, match="16 bytes"):
        LocalBackend(keys_dir, os.urandom(16))


def test_check_refuses_an_unwriteable_keys_dir(keys_dir: Path, master_key: bytes) -> None:
    backend = LocalBackend(keys_dir, master_key)
    keys_dir.chmod(0o500)
    try:
        if os.access(keys_dir, os.W_OK):  # running as root: permissions do not bind
            keys_dir.rmdir()
            keys_dir.write_text("now a file")
        with pytest.raises(BackendError, match=str(keys_dir)):
            backend.check()
    finally:
        if keys_dir.is_dir():
            keys_dir.chmod(0o700)


# ------------------------------------------------------------------ master key


@pytest.mark.usefixtures("no_env_master_key")
class TestMasterKey:
    def test_nothing_configured_resolves_to_none_and_from_settings_says_how(
        self, tmp_path: Path
    ) -> None:
        settings = settings_for(tmp_path)
        assert resolve_master_key(settings) is None
        with pytest.raises(ConfigError, match="no master key.*KEYD_MASTER_KEY.*master-key"):
            from_settings(settings)

    def test_created_file_is_0600_in_a_0700_data_dir_and_is_used(self, tmp_path: Path) -> None:
        settings = settings_for(tmp_path)
        path = create_master_key_file(settings)
        assert path == settings.backend.options_as(LocalBackendSettings).master_key_file
        assert mode(path) == 0o600
        assert mode(settings.keyd.data_dir) == 0o700
        key = resolve_master_key(settings)
        assert key is not None and len(key) == 32
        assert base64.urlsafe_b64decode(path.read_text().strip() + "=") == key
        backend = from_settings(settings)
        assert backend.capabilities.name == "local"
        backend.generate(Purpose.SIGNING, 2048)
        assert len(list((settings.keyd.data_dir / "keys").iterdir())) == 1

    def test_create_never_overwrites(self, tmp_path: Path) -> None:
        settings = settings_for(tmp_path)
        path = create_master_key_file(settings)
        before = path.read_bytes()
        with pytest.raises(ConfigError, match="already exists"):
            create_master_key_file(settings)
        assert path.read_bytes() == before

    def test_file_readable_by_others_is_refused_naming_path_and_mode(self, tmp_path: Path) -> None:
        settings = settings_for(tmp_path)
        path = create_master_key_file(settings)
        path.chmod(0o644)
        with pytest.raises(ConfigError, match=f"{path}.*0644"):
            resolve_master_key(settings)

    def test_file_wins_over_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        settings = settings_for(tmp_path)
        create_master_key_file(settings)
        from_file = resolve_master_key(settings)
        monkeypatch.setenv("KEYD_MASTER_KEY", b64url(os.urandom(32)))
        assert resolve_master_key(settings) == from_file

    @pytest.mark.parametrize("pad", [False, True])
    def test_environment_variable_is_used(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pad: bool
    ) -> None:
        key = os.urandom(32)
        monkeypatch.setenv("KEYD_MASTER_KEY", b64url(key, pad=pad))
        assert resolve_master_key(settings_for(tmp_path)) == key

    def test_environment_wins_over_credential(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        env_key, cred_key = os.urandom(32), os.urandom(32)
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "master-key").write_text(b64url(cred_key))
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        monkeypatch.setenv("KEYD_MASTER_KEY", b64url(env_key))
        assert resolve_master_key(settings_for(tmp_path)) == env_key

    def test_systemd_credential_is_used(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        key = os.urandom(32)
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "master-key").write_text(b64url(key) + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        assert resolve_master_key(settings_for(tmp_path)) == key

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("not*base64!", "not base64url"),
            ("abc/def+ghi", "not base64url"),  # standard alphabet, not url-safe
            (b64url(b"\x01" * 16), "16 bytes"),
            (b64url(b"\x01" * 33), "33 bytes"),
            ("AAAAA", "not valid base64url"),  # 5 characters cannot be base64
        ],
    )
    def test_bad_environment_value_is_refused_naming_the_source_not_the_value(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, reason: str
    ) -> None:
        monkeypatch.setenv("KEYD_MASTER_KEY", value)
        with pytest.raises(ConfigError, match=reason) as caught:
            resolve_master_key(settings_for(tmp_path))
        assert "$KEYD_MASTER_KEY" in caught.value.detail
        assert value not in caught.value.detail

    def test_bad_credential_is_refused_naming_the_credential(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "master-key").write_text(b64url(b"\x02" * 31))
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        with pytest.raises(ConfigError, match="credential master-key.*31 bytes"):
            resolve_master_key(settings_for(tmp_path))

    def test_bad_file_content_is_refused_naming_the_file(self, tmp_path: Path) -> None:
        settings = settings_for(tmp_path)
        path = create_master_key_file(settings)
        path.write_text("short\n")
        with pytest.raises(ConfigError, match=f"file {path}"):
            resolve_master_key(settings)
