"""Benchmark: POST /v1/sign/jws with the vault backend, beside a direct transit
sign loop measured in the same run against the same OpenBao server and key.

    .venv/bin/python bench/sign_vault.py [--seconds 10] [--connections 32] [--threads 16]

Starts its own OpenBao dev server (the `bao` binary beside this Python, a free
port, a random root token; stopped at the end) and a keyd daemon on it; drives
the daemon with wrk, then signs directly through hvac from N threads (prehashed
SHA-256, PSS, salt_length=hash: exactly the request keyd makes).  Prints JSON:
keyd-on-vault sign/s with p50/p99, direct transit sign/s with p50/p99, and the
ratio keyd/direct.  Every keyd sign is one transit round trip, so the ratio
says what keyd's own work (auth, policy, JOSE, audit, HTTP) costs on top.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sign_jws import wrk  # noqa: E402 - after the path fix
from tests.daemon import keyd, start, write_config  # noqa: E402
from tests.fixtures.openbao import BaoServer, start_server, stop_server  # noqa: E402

MOUNT = "transit"


def direct_transit_loop(server: BaoServer, key: str, threads: int,
                        seconds: float) -> dict[str, float]:
    """Sign from ``threads`` threads for ``seconds``, one hvac client each."""
    digest = base64.b64encode(hashlib.sha256(b"eyJhbGciOiJQUzI1NiJ9.e30").digest()).decode()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    go = threading.Event()
    deadline = [0.0]

    def worker(i: int) -> None:
        transit = server.client().secrets.transit
        go.wait()
        while (started := time.monotonic()) < deadline[0]:
            try:
                transit.sign_data(key, hash_input=digest, hash_algorithm="sha2-256",
                                  prehashed=True, signature_algorithm="pss",
                                  salt_length="hash", mount_point=MOUNT)
            except Exception:  # noqa: BLE001 - a benchmark counts failures, it does not stop
                errors[i] += 1
                continue
            latencies[i].append(time.monotonic() - started)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    go.set()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - began
    merged = sorted(x for per_thread in latencies for x in per_thread)
    if not merged:
        raise SystemExit("the direct transit loop made no signature")
    cuts = statistics.quantiles(merged, n=100)
    return {
        "signs_per_second": round(len(merged) / elapsed, 1),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "errors": float(sum(errors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections to keyd")
    parser.add_argument("--threads", type=int, default=16, help="direct transit loop threads")
    args = parser.parse_args()

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
            })
            keyd(config, "init")
            token = keyd(config, "client", "add", "bench", "--policy", "service").stdout.strip()
            names = server.client().secrets.transit.list_keys(mount_point=MOUNT)["data"]["keys"]
            signing_key = next(n for n in names if n.startswith("keyd-signing-"))
            daemon = start(config)
            try:
                url = daemon.api_url + "/v1/sign/jws"
                wrk(url, token, 2, args.connections)  # warm-up
                keyd_result = wrk(url, token, args.seconds, args.connections)
            finally:
                daemon.stop()
            direct_transit_loop(server, signing_key, args.threads, 2)  # warm-up
            direct = direct_transit_loop(server, signing_key, args.threads, args.seconds)
        finally:
            stop_server(server.pid, server.root_token)
    result = {
        "benchmark": "POST /v1/sign/jws (vault backend: OpenBao transit, RSA-2048 PS256)",
        **keyd_result,
        "direct_transit": {"threads": args.threads, **direct},
        "ratio": round(keyd_result["signs_per_second"] / direct["signs_per_second"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
