"""Benchmark: POST /v1/sign/jws with the signing key on a SoftHSM2 token, beside
a direct PKCS#11 sign loop on the same token and key, measured in the same run.

    .venv/bin/python bench/sign_pkcs11.py [--seconds 5] [--connections 16] [--sessions 4]

1. A fresh token in a temporary folder; `keyd init` makes the keys on it.
2. `keyd serve` on that token, driven by wrk (as bench/sign_jws.py does), in
   one process: SoftHSM2's file store wants one process per token directory.
3. The daemon stopped (SoftHSM2's file store wants one process per token
   directory), this process signs in a loop on the same key with
   CKM_SHA256_RSA_PKCS_PSS (salt 32, as PS256), one session per thread, for
   1 and then 2 threads, each for the same fixed duration.

Prints JSON: keyd-on-HSM signs/s with p50/p99, the direct loop's signs/s per
thread count, and keyd / the best direct rate.  The direct loop is the
ceiling: keyd adds HTTP, JSON, JOSE and the audit log around each C_Sign.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402 - after the path fix
    arguments,
    timed_loop,
    worker_rss_mib,
    wrk,
)
from tests.fixtures.daemon import keyd, start, write_config  # noqa: E402
from tests.fixtures.softhsm import SoftHsm, initialise_token  # noqa: E402

DATA = b'eyJhbGciOiJQUzI1NiIsImtpZCI6ImJlbmNoIn0.eyJpc3MiOiJiZW5jaCIsIm4iOjF9'


def config_for(folder: Path, hsm: SoftHsm, sessions: int) -> Path:
    pin_file = folder / "pkcs11.pin"
    pin_file.touch(mode=0o600)
    pin_file.write_text(hsm.pin + "\n", encoding="utf-8")
    return write_config(folder, {
        "backend": {"kind": "pkcs11"},
        "backend.pkcs11": {"module": str(hsm.module), "token_label": hsm.label,
                           "pin_file": pin_file.name, "sessions": sessions,
                           "oaep_sha256": "raw"},
        "lifecycle.transport": {"enabled": False},
    })


def signing_key_id(folder: Path) -> bytes:
    with sqlite3.connect(folder / "var" / "keyd.db") as db:
        (ref,) = db.execute(
            "SELECT backend_ref FROM key_versions WHERE purpose = 'signing' AND state = 'active'"
        ).fetchone()
    return bytes.fromhex(str(ref).removeprefix("pkcs11:"))


def direct_signs_per_second(hsm: SoftHsm, key_id: bytes, threads: list[int],
                            seconds: float) -> dict[str, float]:
    """C_Sign in a loop on ``key_id``, one session per thread, for each thread count."""
    # Set before the module's C_Initialize in this process: SoftHSM2 reads it then.
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    from pkcs11 import MGF, Mechanism, ObjectClass

    from keyd.backends.pkcs11 import load_module

    token = load_module(hsm.module).get_token(token_label=hsm.label)
    # One logged-in session for the whole run: the login is per process, and
    # closing the session that logged in would log every session out.
    login = token.open(user_pin=hsm.pin)
    param = (Mechanism.SHA256, MGF.SHA256, 32)
    rates: dict[str, float] = {}
    opened: list[Any] = []

    def make() -> Callable[[], object]:
        """Each thread's own session and key handle: C_Sign on ``key_id``."""
        session = token.open()
        opened.append(session)
        # A PrivateKey (it signs); python-pkcs11's get_key is typed as the base Key.
        key: Any = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
        return lambda: key.sign(DATA, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                                mechanism_param=param)

    try:
        for n in threads:
            rates[str(n)] = timed_loop(make, n, seconds)["per_second"]
            while opened:
                opened.pop().close()
    finally:
        login.close()
    return rates


def main() -> None:
    args = arguments(__doc__,
                     extra=lambda p: p.add_argument("--sessions", type=int, default=4,
                                                   help="[backend.pkcs11] sessions"))

    with tempfile.TemporaryDirectory(prefix="keyd-bench-pkcs11-") as tmp:
        folder = Path(tmp)
        hsm = initialise_token(folder / "softhsm", "keyd-bench")
        env = {"SOFTHSM2_CONF": str(hsm.conf)}
        config = config_for(folder, hsm, args.sessions)
        keyd(config, "init", env=env)
        token = keyd(config, "client", "add", "bench", "--policy", "service",
                     env=env).stdout.strip()
        daemon = start(config, env)
        try:
            url = daemon.api_url + "/v1/sign/jws"
            wrk(url, token, 2, args.connections)  # warm-up
            keyd_result = wrk(url, token, args.seconds, args.connections)
            rss = worker_rss_mib(daemon)
        finally:
            daemon.stop()
        # The daemon has exited: this process is now the token's only user.
        direct = direct_signs_per_second(hsm, signing_key_id(folder), [1, 2],
                                         min(args.seconds, 5))
    best = max(direct.values())
    result = {
        "benchmark": "POST /v1/sign/jws (pkcs11 backend on SoftHSM2, RSA-2048 PS256)",
        "keyd_on_hsm": {**keyd_result, "connections": args.connections,
                        "sessions": args.sessions},
        "direct_pkcs11_signs_per_second_by_threads": direct,
        "worker_rss_mib": rss,
        "ratio": round(keyd_result["per_second"] / best, 3),
        "target": 0.85,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
