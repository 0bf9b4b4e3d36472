"""The vault backend against a real OpenBao server (tests/fixtures/openbao.py)."""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hvac.exceptions  # type: ignore[import-untyped]
import pytest
from cryptography.exceptions import InvalidSignature

from keyd.backends.base import GeneratedKey
from keyd.backends.vault import VaultBackend
from keyd.config import VaultBackendSettings
from keyd.errors import BackendError, BackendUnavailable, Unsupported
from keyd.model import OaepHash, Purpose, SignScheme
from tests.backend_contract import BackendContract, oaep_encrypt, strict_pss_verify
from tests.fixtures.openbao import BaoServer
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.vault

POLICY = Path(__file__).parent.parent / "policies" / "vault" / "keyd-transit.hcl"


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return path


def settings(
    addr: str, mount: str, *, token_file: Path | None = None, auth: str = "token",
    role_id: str = "", secret_id_file: Path | None = None,
) -> VaultBackendSettings:
    return VaultBackendSettings(
        addr=addr, mount=mount, key_prefix="keyd-", namespace="", auth=auth,
        token_file=token_file, role_id=role_id, secret_id_file=secret_id_file, timeout=2.0,
    )


def token_backend(addr: str, mount: str, token: str, tmp_path: Path) -> VaultBackend:
    return VaultBackend(settings(addr, mount, token_file=secret_file(tmp_path, "token", token)))


@pytest.fixture
def backend(openbao: BaoServer, transit_mount: str, tmp_path: Path) -> Iterator[VaultBackend]:
    b = token_backend(openbao.addr, transit_mount, openbao.root_token, tmp_path)
    yield b
    b.close()


class TestVaultBackendContract(BackendContract):
    def test_rsa_oaep_sha1_is_unsupported_naming_the_limitation(
        self, backend: VaultBackend, encryption_key: GeneratedKey
    ) -> None:
        """Transit decrypts RSA-OAEP-256 only: SHA-1 is left out of the capabilities,
        and the contract's Unsupported says why and what to use instead."""
        assert OaepHash.SHA1 not in backend.capabilities.oaep_hashes
        ciphertext = oaep_encrypt(encryption_key.public_key, os.urandom(32), OaepHash.SHA1)
        with pytest.raises(Unsupported, match="SHA-256 only.*RSA-OAEP.*RSA-OAEP-256"):
            backend.decrypt(encryption_key.ref, ciphertext, OaepHash.SHA1)


def test_signing_and_encryption_keys_are_not_exportable_in_vault(
    openbao: BaoServer, transit_mount: str, backend: VaultBackend
) -> None:
    transit = openbao.client().secrets.transit
    for purpose in (Purpose.SIGNING, Purpose.ENCRYPTION):
        key = backend.generate(purpose, 2048)
        data = transit.read_key(key.ref, mount_point=transit_mount)["data"]
        assert data["exportable"] is False
        assert data["allow_plaintext_backup"] is False
        assert data["deletion_allowed"] is False
        for kind in ("encryption-key", "signing-key"):
            with pytest.raises(hvac.exceptions.InvalidRequest, match="not exportable"):
                transit.export_key(key.ref, kind, mount_point=transit_mount)


def test_only_transport_keys_may_be_created_exportable(backend: VaultBackend) -> None:
    for purpose in (Purpose.SIGNING, Purpose.ENCRYPTION):
        with pytest.raises(BackendError, match="never exportable"):
            backend.generate(purpose, 2048, exportable=True)


def test_transit_default_pss_salt_fails_a_strict_verifier(
    openbao: BaoServer, transit_mount: str, backend: VaultBackend
) -> None:
    """Without salt_length=hash transit salts as long as possible: not JWS PS256."""
    key = backend.generate(Purpose.SIGNING, 2048)
    data = b"eyJhbGciOiJQUzI1NiJ9.e30"
    answer = openbao.client().secrets.transit.sign_data(
        key.ref, hash_input=base64.b64encode(data).decode(), hash_algorithm="sha2-256",
        signature_algorithm="pss", mount_point=transit_mount,
    )
    default_salt = base64.b64decode(answer["data"]["signature"].split(":")[2])
    with pytest.raises(InvalidSignature):
        strict_pss_verify(key.public_key, default_salt, data)
    strict_pss_verify(key.public_key, backend.sign(key.ref, data, SignScheme.PSS_SHA256), data)


def test_many_threads_sign_concurrently_on_one_backend(backend: VaultBackend) -> None:
    key = backend.generate(Purpose.SIGNING, 2048)
    messages = [os.urandom(64) for _ in range(40)]
    with ThreadPoolExecutor(8) as pool:
        signatures = list(
            pool.map(lambda m: backend.sign(key.ref, m, SignScheme.PSS_SHA256), messages)
        )
    for message, signature in zip(messages, signatures, strict=True):
        strict_pss_verify(key.public_key, signature, message)


def test_a_key_outside_the_prefix_is_not_listed(
    openbao: BaoServer, transit_mount: str, backend: VaultBackend
) -> None:
    openbao.client().secrets.transit.create_key("someone-else", mount_point=transit_mount)
    mine = backend.generate(Purpose.ENCRYPTION, 2048)
    assert backend.list_refs() == [mine.ref]


# ------------------------------------------------------------------ auth


def test_revoked_token_is_backend_unavailable_quickly(
    openbao: BaoServer, transit_mount: str, tmp_path: Path
) -> None:
    root = openbao.client()
    root.sys.create_or_update_policy(
        f"keyd-{transit_mount}", POLICY.read_text().replace('"transit/', f'"{transit_mount}/')
    )
    token = root.auth.token.create(policies=[f"keyd-{transit_mount}"], ttl="1h")["auth"]
    b = token_backend(openbao.addr, transit_mount, token["client_token"], tmp_path)
    key = b.generate(Purpose.SIGNING, 2048)
    b.renew()  # a renewable token renews
    root.auth.token.revoke(token["client_token"])
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="permission denied") as caught:
        b.sign(key.ref, b"x", SignScheme.PSS_SHA256)
    assert time.monotonic() - started < 4  # correctness bound: an outage answers fast
    assert caught.value.retry_after > 0
    with pytest.raises(BackendUnavailable):
        b.check()
    with pytest.raises(BackendUnavailable):
        b.renew()


@pytest.fixture
def approle(openbao: BaoServer, transit_mount: str, tmp_path: Path) -> dict[str, Any]:
    """An AppRole at a unique path whose tokens carry only keyd's transit policy."""
    root = openbao.client()
    path = f"approle-{secrets.token_hex(4)}"
    root.sys.enable_auth_method("approle", path=path)
    policy = f"keyd-{transit_mount}"
    root.sys.create_or_update_policy(
        policy, POLICY.read_text().replace('"transit/', f'"{transit_mount}/')
    )
    root.auth.approle.create_or_update_approle(
        "keyd", token_policies=[policy], mount_point=path,
        token_ttl="1h", token_max_ttl="4h",  # noqa: S106  durations, not passwords
    )
    role_id = root.auth.approle.read_role_id("keyd", mount_point=path)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("keyd", mount_point=path)["data"]
    return {
        "path": path,
        "role_id": role_id,
        "secret_id_file": secret_file(tmp_path, "secret-id", secret_id["secret_id"]),
    }


def approle_backend(openbao: BaoServer, mount: str, approle: dict[str, Any]) -> VaultBackend:
    return VaultBackend(
        settings(openbao.addr, mount, auth="approle", role_id=approle["role_id"],
                 secret_id_file=approle["secret_id_file"]),
        approle_mount=approle["path"],
    )


def test_approle_backend_works_under_the_shipped_least_privilege_policy(
    openbao: BaoServer, transit_mount: str, approle: dict[str, Any]
) -> None:
    b = approle_backend(openbao, transit_mount, approle)
    b.check()
    signing = b.generate(Purpose.SIGNING, 2048)
    strict_pss_verify(signing.public_key, b.sign(signing.ref, b"m", SignScheme.PSS_SHA256), b"m")
    enc = b.generate(Purpose.ENCRYPTION, 2048)
    cek = os.urandom(32)
    ct = oaep_encrypt(enc.public_key, cek, OaepHash.SHA256)
    assert b.decrypt(enc.ref, ct, OaepHash.SHA256) == cek
    transport = b.generate(Purpose.TRANSPORT, 2048, exportable=True)
    assert b"PRIVATE KEY" in b.export_private_key_pem(transport.ref)
    assert sorted(b.list_refs()) == sorted([signing.ref, enc.ref, transport.ref])
    b.renew()
    b.destroy(signing.ref)
    assert signing.ref not in b.list_refs()


def test_approle_relogs_in_after_its_token_is_revoked(
    openbao: BaoServer, transit_mount: str, approle: dict[str, Any]
) -> None:
    b = approle_backend(openbao, transit_mount, approle)
    key = b.generate(Purpose.SIGNING, 2048)
    # Revoke every token this AppRole has issued (the backend's included).
    openbao.client().sys.revoke_prefix(f"auth/{approle['path']}/login")
    signature = b.sign(key.ref, b"after revocation", SignScheme.PSS_SHA256)
    strict_pss_verify(key.public_key, signature, b"after revocation")
    openbao.client().sys.revoke_prefix(f"auth/{approle['path']}/login")
    b.renew()  # renewal of a revoked token fails, so it logs in afresh
    b.check()


def test_approle_without_a_secret_id_says_where_it_looked(
    openbao: BaoServer, transit_mount: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_SECRET_ID", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    b = VaultBackend(settings(openbao.addr, transit_mount, auth="approle", role_id="r",
                              secret_id_file=tmp_path / "absent"))
    with pytest.raises(Exception, match="vault-secret-id") as caught:
        b.check()
    assert caught.value.__class__.__module__ == "keyd.errors"


# ------------------------------------------------------------------ faults


def test_unreachable_slow_and_recovered_vault_through_a_proxy(
    openbao: BaoServer, transit_mount: str, tmp_path: Path
) -> None:
    host, port = openbao.addr.removeprefix("http://").rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        b = token_backend(proxy.addr, transit_mount, openbao.root_token, tmp_path)
        key = b.generate(Purpose.SIGNING, 2048)

        proxy.refuse()
        with pytest.raises(BackendUnavailable, match="unreachable") as caught:
            b.sign(key.ref, b"x", SignScheme.PSS_SHA256)
        assert caught.value.retry_after > 0
        with pytest.raises(BackendUnavailable):
            b.check()

        proxy.delay(5.0)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no answer .* within 2 s"):
            b.sign(key.ref, b"x", SignScheme.PSS_SHA256)
        # Correctness, not performance: a 2 s timeout must not wait out a 5 s stall.
        assert time.monotonic() - started < 4

        proxy.pass_through()
        signature = b.sign(key.ref, b"back", SignScheme.PSS_SHA256)
        strict_pss_verify(key.public_key, signature, b"back")
        b.check()
        b.close()


def test_sealed_vault_is_unavailable_and_recovers_on_unseal(
    openbao_private: BaoServer, tmp_path: Path
) -> None:
    b = token_backend(openbao_private.addr, "transit", openbao_private.root_token, tmp_path)
    key = b.generate(Purpose.SIGNING, 2048)
    openbao_private.seal()
    try:
        with pytest.raises(BackendUnavailable, match=r"vault: sealed at http://127\.0\.0\.1:"):
            b.check()
        with pytest.raises(BackendUnavailable, match="sealed") as caught:
            b.sign(key.ref, b"x", SignScheme.PSS_SHA256)
        assert caught.value.retry_after > 0
    finally:
        openbao_private.unseal()
    signature = b.sign(key.ref, b"unsealed", SignScheme.PSS_SHA256)
    strict_pss_verify(key.public_key, signature, b"unsealed")
    b.check()
