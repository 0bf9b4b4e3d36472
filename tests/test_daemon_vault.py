"""The real daemon on a real OpenBao transit engine, over real sockets.

The HTTP contract every backend passes (tests/daemon_contract.py) runs here
on transit; this module adds what is Vault's own: the keys are checked through
hvac to be non-exportable, and faults are real: a loopback TCP proxy between
the daemon and OpenBao refuses or stalls the connection, a token is revoked,
a private server is sealed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwe, jws

from tests.daemon import Daemon, keyd, running, start, write_config
from tests.daemon_contract import DaemonContract, fetched_jwks, published, rsa_public
from tests.fixtures.openbao import BaoServer
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.vault, pytest.mark.slow]

POLICY = Path(__file__).parent.parent / "policies" / "vault" / "keyd-transit.hcl"
# Correctness bound, not a benchmark: with a 2 s Vault timeout an outage must
# not wait out a 5 s stall (the target is ~2 s; 4 s leaves room for a busy CI).
OUTAGE_BOUND = 4.0


# ---------------------------------------------------------------------- set-up


@dataclass
class Transit:
    """A fresh transit mount and a token that may use only keyd's keys in it."""

    server: BaoServer
    mount: str
    token: str

    def keys(self) -> dict[str, dict[str, Any]]:
        """Every key in the mount, as transit describes it (read as root)."""
        transit = self.server.client().secrets.transit
        names = transit.list_keys(mount_point=self.mount)["data"]["keys"]
        return {n: transit.read_key(n, mount_point=self.mount)["data"] for n in names}


def least_privilege_transit(server: BaoServer, mount: str | None = None) -> Transit:
    """A mount plus a renewable token under the shipped policy (policies/vault/)."""
    root = server.client()
    mount = mount or server.new_transit_mount()
    policy = f"keyd-{mount}"
    root.sys.create_or_update_policy(
        policy, POLICY.read_text().replace('"transit/', f'"{mount}/')
    )
    token = root.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"]
    return Transit(server, mount, token)


def vault_tables(folder: Path, addr: str, transit: Transit,
                 transport: bool = True) -> dict[str, dict[str, Any]]:
    """Config tables for a vault daemon; the token lives in a 0600 file, never in TOML."""
    token_file = folder / "vault-token"
    token_file.touch(mode=0o600)
    token_file.write_text(transit.token + "\n")
    tables: dict[str, dict[str, Any]] = {
        "backend": {"kind": "vault"},
        "backend.vault": {"addr": addr, "mount": transit.mount, "key_prefix": "keyd-",
                          "auth": "token", "token_file": str(token_file), "timeout": 2},
    }
    if not transport:
        tables["lifecycle.transport"] = {"enabled": False}
    return tables


def proxy_to(server: BaoServer) -> TcpProxy:
    host, port = server.addr.removeprefix("http://").rsplit(":", 1)
    return TcpProxy(host, int(port))


@dataclass
class ProxiedDaemon:
    daemon: Daemon
    proxy: TcpProxy
    transit: Transit


@pytest.fixture(scope="module")
def vault_daemon(
    tmp_path_factory: pytest.TempPathFactory, openbao_private: BaoServer
) -> Iterator[ProxiedDaemon]:
    """One daemon for the module, reaching OpenBao only through a switchable proxy.

    Its server is the module's own (``openbao_private``), so the sealing test
    can share this daemon instead of paying for another start-up.
    """
    folder = tmp_path_factory.mktemp("vault-daemon")
    transit = least_privilege_transit(openbao_private)
    with proxy_to(openbao_private) as proxy, \
            running(folder, vault_tables(folder, proxy.addr, transit)) as daemon:
        yield ProxiedDaemon(daemon, proxy, transit)


@contextmanager
def service_daemon(folder: Path, tables: dict[str, dict[str, Any]],
                   before_start: Callable[[], None] = lambda: None) -> Iterator[Daemon]:
    """init, one service client, serve: `running()` minus the admin client, for speed.

    ``before_start`` runs after init and before serve (to cut Vault off, say).
    """
    config = write_config(folder, tables)
    keyd(config, "init")
    token = keyd(config, "client", "add", "svc-1", "--policy", "service").stdout.strip()
    before_start()
    daemon = start(config, service_token=token)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def daemon(vault_daemon: ProxiedDaemon) -> Iterator[Daemon]:
    """The shared daemon, its proxy passing traffic again whatever the test did."""
    yield vault_daemon.daemon
    vault_daemon.proxy.pass_through()


@pytest.fixture
def svc(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.service_token) as client:
        yield client


class TestVaultDaemon(DaemonContract):
    """The contract on transit, reached through the switchable proxy."""

    backend = "vault"
    decrypts = frozenset({"RSA-OAEP-256"})  # transit has no OAEP hash parameter


# ---------------------------------------------------------------------- keys in transit


def test_init_creates_non_exportable_transit_keys_that_the_jwks_publishes(
    vault_daemon: ProxiedDaemon, daemon: Daemon
) -> None:
    keys = vault_daemon.transit.keys()
    by_purpose = {purpose: [data for name, data in keys.items()
                            if name.startswith(f"keyd-{purpose}-")]
                  for purpose in ("signing", "encryption", "transport")}
    assert {p: len(found) for p, found in by_purpose.items()} == {
        "signing": 1, "encryption": 1, "transport": 1}
    jwks = {k.get("use"): k for k in fetched_jwks(daemon).keys}
    for purpose, use in (("signing", "sig"), ("encryption", "enc")):
        data = by_purpose[purpose][0]
        # The private half can never leave transit: not exportable, no plaintext backup.
        assert data["exportable"] is False
        assert data["allow_plaintext_backup"] is False
        assert data["type"] == "rsa-2048"
        pem = data["keys"][str(data["latest_version"])]["public_key"].encode()
        public = serialization.load_pem_public_key(pem)
        assert isinstance(public, rsa.RSAPublicKey)
        assert rsa_public(jwks[use]).public_numbers() == public.public_numbers()
    assert "tls" not in jwks  # the transport key is not published by default


# ---------------------------------------------------------------------- faults


def assert_backend_down(daemon: Daemon, svc: httpx.Client) -> None:
    """503 + Retry-After on sign within the bound, /readyz down, JWKS still served."""
    started = time.monotonic()
    answer = svc.post("/v1/sign/jws", json={"payload": "during the outage"})
    elapsed = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) > 0
    assert answer.json()["error"] == "backend_unavailable"
    assert "vault" in answer.json()["detail"]
    assert elapsed < OUTAGE_BOUND, f"sign took {elapsed:.1f} s during the outage"
    with daemon.client() as anonymous:
        ready = anonymous.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert "vault" in ready.json()["checks"]["backend"]
    with daemon.public() as public:
        jwks = public.get("/jwks")
    assert jwks.status_code == 200
    assert {k["use"] for k in jwks.json()["keys"]} == {"sig", "enc"}


def assert_backend_back(daemon: Daemon, svc: httpx.Client) -> None:
    answer = svc.post("/v1/sign/jws", json={"payload": "after the outage"})
    assert answer.status_code == 200, answer.text
    jws.deserialize_compact(answer.json()["jws"], fetched_jwks(daemon), algorithms=["PS256"])
    with daemon.client() as anonymous:
        ready = anonymous.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_unreachable_vault_gives_503_then_recovers_without_restart(
    vault_daemon: ProxiedDaemon, daemon: Daemon, svc: httpx.Client
) -> None:
    pid = daemon.proc.pid
    enc_key = published(daemon, "enc")
    token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": enc_key.kid},
                                b"{}", enc_key, algorithms=["RSA-OAEP-256", "A256GCM"])
    vault_daemon.proxy.refuse()
    assert_backend_down(daemon, svc)
    decrypt = svc.post("/v1/decrypt/jwe", json={"jwe": token})
    assert decrypt.status_code == 503, decrypt.text
    assert int(decrypt.headers["Retry-After"]) > 0
    vault_daemon.proxy.pass_through()
    assert_backend_back(daemon, svc)
    assert svc.post("/v1/decrypt/jwe", json={"jwe": token}).status_code == 200
    assert daemon.proc.pid == pid and daemon.alive()


def test_stalled_vault_gives_503_within_the_timeout_then_recovers(
    vault_daemon: ProxiedDaemon, daemon: Daemon, svc: httpx.Client
) -> None:
    vault_daemon.proxy.delay(5.0)
    assert_backend_down(daemon, svc)
    vault_daemon.proxy.pass_through()
    assert_backend_back(daemon, svc)


def test_sealed_vault_gives_503_and_unseal_restores_service_without_restart(
    openbao_private: BaoServer, daemon: Daemon, svc: httpx.Client
) -> None:
    pid = daemon.proc.pid
    openbao_private.seal()
    try:
        assert_backend_down(daemon, svc)
        answer = svc.post("/v1/sign/jws", json={"payload": "x"})
        assert "sealed" in answer.json()["detail"]
    finally:
        openbao_private.unseal()
    assert_backend_back(daemon, svc)
    assert daemon.proc.pid == pid and daemon.alive()


def test_revoked_token_gives_503_with_retry_after(tmp_path: Path, openbao: BaoServer) -> None:
    transit = least_privilege_transit(openbao)
    try:
        with service_daemon(tmp_path, vault_tables(tmp_path, openbao.addr, transit,
                                                   transport=False)) as daemon, \
                daemon.client(daemon.service_token) as svc:
            assert svc.post("/v1/sign/jws", json={"payload": "x"}).status_code == 200
            openbao.client().auth.token.revoke(transit.token)
            started = time.monotonic()
            answer = svc.post("/v1/sign/jws", json={"payload": "x"})
            assert answer.status_code == 503, answer.text
            assert time.monotonic() - started < OUTAGE_BOUND
            assert int(answer.headers["Retry-After"]) > 0
            assert "permission denied" in answer.json()["detail"]
            with daemon.client() as anonymous:
                assert anonymous.get("/readyz").status_code == 503
            with daemon.public() as public:
                assert public.get("/jwks").status_code == 200
    finally:
        openbao.drop_mount(transit.mount)


def test_daemon_started_while_vault_is_unreachable_serves_jwks_and_recovers(
    tmp_path: Path, openbao: BaoServer
) -> None:
    transit = least_privilege_transit(openbao)
    try:
        with proxy_to(openbao) as proxy, \
                service_daemon(tmp_path, vault_tables(tmp_path, proxy.addr, transit,
                                                      transport=False),
                               before_start=proxy.refuse) as daemon, \
                daemon.client(daemon.service_token) as svc:
            # Keys were made while Vault was up; the JWKS comes from the store.
            assert_backend_down(daemon, svc)
            proxy.pass_through()
            assert_backend_back(daemon, svc)
    finally:
        openbao.drop_mount(transit.mount)
