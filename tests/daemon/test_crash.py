"""The failpoint sweep: keyd SIGKILLs itself at every named step of a rotation,
revocation or destruction; after a restart the SPEC invariants hold.

Invariants checked after each restart: exactly one active key per enabled
purpose; every token signed before the crash (by a key not deliberately
revoked) verifies against the JWKS the restarted daemon serves; the backend
holds exactly the keys the store still needs (no orphan, none lost).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from keyd import config, failpoints, lifecycle
from keyd.model import KeyState, Purpose
from keyd.service import KeyService
from keyd.tokens import TokenService
from tests.fixtures.daemon import KEYD, keyd, start, write_config

pytestmark = pytest.mark.slow  # a real keyd process per test or module

# How each failpoint is reached: (overlap, the command that runs into it).
# "serve" = the daemon's start-up reconcile after `keyd rotate` left a pending key.
SCENARIOS: dict[str, tuple[str, str]] = {
    "after_generate": ("1h", "rotate"),
    "after_certificate": ("1h", "rotate"),
    "after_create": ("1h", "rotate"),
    "before_activate": ("1h", "serve"),
    "after_activate": ("1h", "rotate-now"),
    "before_revoke": ("1h", "revoke"),
    "after_revoke": ("1h", "revoke"),
    "before_destroy": ("0s", "serve-destroy"),
    "before_backend_destroy": ("0s", "serve-destroy"),
    "after_backend_destroy": ("0s", "serve-destroy"),
}


def test_every_failpoint_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(failpoints.POINTS)


def sign_tokens(cfg: Path, n: int = 2) -> list[str]:
    """Tokens signed now, in-process, by the store's active signing key."""
    service = KeyService.open(config.load(cfg))
    try:
        tokens = TokenService(service)
        return [tokens.sign_jwt(service.admin_caller(), {"n": i}, 600).token for i in range(n)]
    finally:
        service.close()


def killed(cfg: Path, failpoint: str, *args: str) -> None:
    """Run keyd with the failpoint armed; it must die by SIGKILL there."""
    result = subprocess.run(
        [*KEYD, "--config", str(cfg), *args], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, failpoints.ENV: f"{failpoint}:kill"},
    )
    assert result.returncode == -signal.SIGKILL, (failpoint, result.returncode, result.stderr)


def active_kid(cfg: Path, purpose: str) -> str:
    listed: list[dict[str, Any]] = json.loads(keyd(cfg, "keys", "list", "--json").stdout)
    return next(str(k["kid"]) for k in listed if k["purpose"] == purpose
                and k["state"] == "active")


@pytest.mark.parametrize("point", failpoints.POINTS)
def test_crash_at_failpoint_then_restart_keeps_the_invariants(tmp_path: Path, point: str) -> None:
    overlap, how = SCENARIOS[point]
    life = {"prepublish": "0s", "overlap": overlap}
    cfg = write_config(tmp_path, {
        "lifecycle.transport": {"enabled": False},
        "lifecycle.signing": life, "lifecycle.encryption": life,
    })
    keyd(cfg, "init")
    if how == "serve-destroy":
        keyd(cfg, "rotate", "signing", "--now")  # the old key is retired, due for destruction
    tokens = sign_tokens(cfg)
    if how == "rotate":
        killed(cfg, point, "rotate", "signing")
    elif how == "rotate-now":
        killed(cfg, point, "rotate", "signing", "--now")
    elif how == "revoke":
        # "--": a kid is base64url, and one in 64 starts with "-".
        killed(cfg, point, "revoke", "--reason", "sweep", "--", active_kid(cfg, "encryption"))
    else:
        if how == "serve":
            keyd(cfg, "rotate", "signing")  # pending; prepublish 0s: due at start-up
        killed(cfg, point, "serve")

    daemon = start(cfg)  # restart: the start-up reconcile runs before it listens
    try:
        jwks = httpx.get(daemon.public_url + "/jwks", timeout=10).json()
    finally:
        daemon.stop()

    settings = config.load(cfg)
    service = KeyService.open(settings)
    try:
        keys = service.keys()
        for purpose in settings.enabled_purposes():
            actives = [k for k in keys if k.purpose is purpose and k.state is KeyState.ACTIVE]
            assert len(actives) == 1, (point, purpose, actives)
        published = {k.kid for k in keys if k.state.published
                     and k.purpose is not Purpose.TRANSPORT}
        assert {k["kid"] for k in jwks["keys"]} == published
        key_set = KeySet.import_key_set(jwks)
        for token in tokens:
            jwt.decode(token, key_set, algorithms=["PS256"])  # raises if the kid is unknown
        held, known = service.backend_refs()
        live = {ref for ref, (_, state) in known.items() if state in lifecycle.LIVE_STATES}
        assert held == live, (point, held ^ live)
    finally:
        service.close()
