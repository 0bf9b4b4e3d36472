"""Benchmark: POST /v1/sign/jws with the vault backend, beside a direct transit
sign loop measured in the same run against the same OpenBao server and key.

    .venv/bin/python bench/sign_vault.py [--seconds 5] [--connections 16]

Starts its own OpenBao dev server (the `bao` binary beside this Python, a free
port, a random root token; stopped at the end) and a keyd daemon on it; drives
the daemon with wrk, then signs directly through hvac from N threads (prehashed
SHA-256, PSS, salt_length=hash: exactly the request keyd makes).  Prints JSON:
keyd-on-vault sign/s with p50/p99, direct transit sign/s with p50/p99, and the
ratio keyd/direct.  Every keyd sign is one transit round trip, so the ratio
says what keyd's own work (auth, policy, JOSE, audit, HTTP) costs on top.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402 - after the path fix
    arguments,
    timed_loop,
    worker_rss_mib,
    wrk,
)
from tests.fixtures.daemon import keyd, start, write_config  # noqa: E402
from tests.fixtures.openbao import BaoServer, start_server, stop_server  # noqa: E402

MOUNT = "transit"


def direct_transit_loop(server: BaoServer, key: str, threads: int,
                        seconds: float) -> dict[str, float]:
    """Sign from ``threads`` threads for ``seconds``, one hvac client each."""
    digest = base64.b64encode(hashlib.sha256(b"eyJhbGciOiJQUzI1NiJ9.e30").digest()).decode()

    def make() -> Callable[[], object]:
        transit = server.client().secrets.transit
        return lambda: transit.sign_data(key, hash_input=digest, hash_algorithm="sha2-256",
                                         prehashed=True, signature_algorithm="pss",
                                         salt_length="hash", mount_point=MOUNT)

    return timed_loop(make, threads, seconds)


def main() -> None:
    args = arguments(__doc__)

    with tempfile.TemporaryDirectory(prefix="keyd-bench-vault-") as folder:
        server = start_server(Path(folder) / "openbao")
        try:
            server.client().sys.enable_secrets_engine("transit", path=MOUNT)
            token_file = Path(folder) / "vault-token"
            token_file.touch(mode=0o600)
            token_file.write_text(server.root_token + "\n")
            config = write_config(Path(folder), {
                "backend": {"kind": "vault"},
                "backend.vault": {"addr": server.addr, "mount": MOUNT,
                                  "token_file": str(token_file)},
                "lifecycle.transport": {"enabled": False},
                "api": {"workers": "auto"},
            })
            keyd(config, "init")
            token = keyd(config, "client", "add", "bench", "--policy", "service").stdout.strip()
            names = server.client().secrets.transit.list_keys(mount_point=MOUNT)["data"]["keys"]
            signing_key = next(n for n in names if n.startswith("keyd-signing-"))
            daemon = start(config)
            try:
                url = daemon.api_url + "/v1/sign/jws"
                wrk(url, token, 1, args.connections)  # warm-up
                keyd_result = wrk(url, token, args.seconds, args.connections)
                rss = worker_rss_mib(daemon)
            finally:
                daemon.stop()
            direct_transit_loop(server, signing_key, args.connections, 2)  # warm-up
            direct = direct_transit_loop(server, signing_key, args.connections, args.seconds)
        finally:
            stop_server(server.pid, server.root_token)
    result = {
        "benchmark": "POST /v1/sign/jws (vault backend: OpenBao transit, RSA-2048 PS256)",
        **keyd_result,
        "direct_transit": {"threads": args.connections, **direct},
        "worker_rss_mib": rss,
        "ratio": round(keyd_result["per_second"] / direct["per_second"], 3),
        "target": 0.85,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
