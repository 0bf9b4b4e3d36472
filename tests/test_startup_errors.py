"""A backend that cannot start says why in ONE line, and exits 1 (not 70).

Exit 70 is keyd's "internal error": a foreign exception that escaped its
wrapper.  Each backend's start-up faults are run here through the real CLI
(`keyd --config X status`, which opens the backend and requires it up), in a
process of its own: SoftHSM2 reads its token directory once per process, and
a CLI run is what an operator sees.
"""

from __future__ import annotations

import _ctypes
import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyd.cli import EXIT_BUG, EXIT_ERROR
from tests.daemon import keyd, write_config
from tests.fixtures.openbao import BaoServer
from tests.fixtures.softhsm import SOFTHSM_MODULE, SoftHsm, hsm_tables, initialise_token


def assert_one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> str:
    """Exit 1, no traceback, and one error line (log warnings aside) matching ``message``."""
    assert result.returncode == EXIT_ERROR != EXIT_BUG, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " WARNING " not in line]
    assert len(errors) == 1, result.stderr
    assert re.fullmatch("keyd: error: " + message + ".*", errors[0]), errors[0]
    return errors[0]


# ---------------------------------------------------------------------- local


def test_local_with_a_wrong_master_key_fails_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    keyd(config, "init")
    other = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    (tmp_path / "var" / "master.key").write_text(other + "\n")
    line = assert_one_clear_line(keyd(config, "status", check=False),
                                 r"store \S+ holds the keys of local master key [0-9a-f]{16}, "
                                 r"but this replica's backend is local master key [0-9a-f]{16}: "
                                 "refusing to start")
    assert other not in line


def test_local_with_a_master_key_of_the_wrong_size_fails_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    keyd(config, "init")
    short = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    (tmp_path / "var" / "master.key").write_text(short + "\n")
    assert_one_clear_line(keyd(config, "status", check=False), r".*master.key.*")


# ---------------------------------------------------------------------- vault


def vault_config(folder: Path, addr: str, token: str, mount: str = "transit") -> Path:
    token_file = folder / "vault-token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    return write_config(folder, {
        "backend": {"kind": "vault"},
        "backend.vault": {"addr": addr, "mount": mount, "auth": "token",
                          "token_file": str(token_file), "timeout": 2},
    })


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.mark.vault
def test_vault_with_a_wrong_token_fails_in_one_line(tmp_path: Path, openbao: BaoServer) -> None:
    config = vault_config(tmp_path, openbao.addr, "s.not-a-token-of-this-server")
    line = assert_one_clear_line(keyd(config, "status", check=False),
                                 r"vault: permission denied at http://127\.0\.0\.1:\d+ for "
                                 r"token lookup \(token revoked or expired")
    assert "not-a-token" not in line


@pytest.mark.vault
def test_vault_at_an_unreachable_address_fails_in_one_line(tmp_path: Path) -> None:
    config = vault_config(tmp_path, f"http://127.0.0.1:{closed_port()}", "s.whatever")
    assert_one_clear_line(keyd(config, "status", check=False),
                          r"vault: unreachable at http://127\.0\.0\.1:\d+ \(ConnectionError\)")


@pytest.mark.parametrize("token", [b"s.t\xc3\xb6k\xe2\x82\xacn", b"\xff\xfe", b"s.two words"],
                         ids=["not-latin-1", "not-utf-8", "a-space"])
def test_vault_with_a_token_that_cannot_be_one_fails_in_one_line(
    tmp_path: Path, token: bytes
) -> None:
    """Never reaches the network: a token must fit in an HTTP header."""
    config = vault_config(tmp_path, f"http://127.0.0.1:{closed_port()}", "placeholder")
    (tmp_path / "vault-token").write_bytes(token + b"\n")
    assert_one_clear_line(keyd(config, "status", check=False),
                          r"\[backend.vault\] the token from file .*vault-token is not a Vault "
                          r"token: it must be printable ASCII without spaces")


# ---------------------------------------------------------------------- pkcs11

# A token with a security officer but no user PIN yet (softhsm2-util always
# sets one, so C_InitToken is called directly).  python-pkcs11 answers the
# login with UserPinNotInitialized, which once escaped as "internal error".
INIT_TOKEN_WITHOUT_USER_PIN = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
assert lib.C_Initialize(None) == 0
count = ctypes.c_ulong(0)
assert lib.C_GetSlotList(0, None, ctypes.byref(count)) == 0
slots = (ctypes.c_ulong * count.value)()
assert lib.C_GetSlotList(0, slots, ctypes.byref(count)) == 0
so_pin, label = sys.argv[3].encode(), sys.argv[2].encode().ljust(32)
assert lib.C_InitToken(slots[0], so_pin, len(so_pin), label) == 0
lib.C_Finalize(None)
"""


@pytest.fixture(scope="module")
def spare_hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """A token of its own for the failing starts (a wrong PIN writes the token's files)."""
    return initialise_token(tmp_path_factory.mktemp("spare-hsm") / "softhsm", "keyd-spare")


@pytest.fixture(scope="module")
def hsm_without_user_pin(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    root = tmp_path_factory.mktemp("no-user-pin")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n", encoding="utf-8")
    subprocess.run(  # noqa: S603 - our interpreter, our script
        [sys.executable, "-c", INIT_TOKEN_WITHOUT_USER_PIN, str(SOFTHSM_MODULE), "keyd-nopin",
         "so-pin-1234"], check=True, timeout=60, env={"SOFTHSM2_CONF": str(conf)},
    )
    return SoftHsm(module=SOFTHSM_MODULE, label="keyd-nopin", pin="user-pin-1234",
                   so_pin="so-pin-1234", conf=conf)


def run_on(hsm: SoftHsm, folder: Path, command: str, *, pin: str | None = None,
           **change: Any) -> subprocess.CompletedProcess[str]:
    config = write_config(folder, hsm_tables(folder, hsm, pin=pin, **change))
    return keyd(config, command, env={"SOFTHSM2_CONF": str(hsm.conf)}, check=False)


@pytest.mark.pkcs11
@pytest.mark.parametrize(
    ("command", "change", "message"),
    [
        ("init", {"pin": "00000000"},
         r"pkcs11: the PIN from file .*pkcs11\.pin is wrong for token 'keyd-spare' "
         r"\(PinIncorrect\)"),
        ("init", {"module": "/opt/no-such-hsm/libp11.so"},
         r"pkcs11: library /opt/no-such-hsm/libp11\.so not found"),
        ("init", {"token_label": "no-such-token"},
         r"pkcs11: no token with label 'no-such-token' in .*tokens present: 'keyd-spare'"),
        ("init", {"oaep_sha256": "token"},
         r'pkcs11: \[backend.pkcs11\] oaep_sha256 = "token", but token .* cannot decrypt'),
        ("status", {"pin": "11111111"},
         r"pkcs11: the PIN from file .*pkcs11\.pin is wrong for token 'keyd-spare'"),
        ("status", {"token_label": "no-such-token"},
         r"pkcs11: no token with label 'no-such-token'"),
        ("status", {"module": _ctypes.__file__},
         r"pkcs11: library .* cannot be loaded: .*C_GetFunctionList"),
        ("status", {"module": "/etc/hostname"},
         r"pkcs11: library /etc/hostname cannot be loaded"),
    ],
    ids=["init-wrong-pin", "init-missing-module", "init-missing-token",
         "init-oaep-token-mode-on-softhsm", "status-wrong-pin", "status-missing-token",
         "status-library-not-pkcs11", "status-library-not-a-library"],
)
def test_a_backend_that_cannot_use_the_hsm_fails_in_one_line(
    spare_hsm: SoftHsm, tmp_path: Path, command: str, change: dict[str, str], message: str
) -> None:
    pin = change.pop("pin", None)
    result = run_on(spare_hsm, tmp_path, command, pin=pin, **change)
    assert_one_clear_line(result, message)
    if pin is not None:
        assert pin not in result.stderr and spare_hsm.pin not in result.stderr


@pytest.mark.pkcs11
def test_a_token_without_a_user_pin_fails_in_one_line_not_as_an_internal_error(
    hsm_without_user_pin: SoftHsm, tmp_path: Path
) -> None:
    result = run_on(hsm_without_user_pin, tmp_path, "status")
    assert_one_clear_line(result, r"pkcs11: token 'keyd-nopin' has no user PIN yet; its "
                                  r"security officer sets one \(C_InitPIN")
    assert hsm_without_user_pin.pin not in result.stderr
