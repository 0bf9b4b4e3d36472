"""Benchmark: sign p99 with and without an issuer whose JWKS trickles.

    .venv/bin/python bench/issuer_isolation.py [--seconds 8] [--connections 16]

keyd runs with two issuers.  Run 1 drives POST /v1/sign/jws with wrk and
nothing else.  Run 2 does the same while background callers keep asking
POST /v1/verify/jws for unknown kids of the "trickle" issuer, whose JWKS
endpoint answers a byte every half second (every such verify needs a
refetch, and the refetch cool-down is 0 s, so one is always under way).
Prints both p99s and their ratio (THREATS "issuer isolation": the target is
a ratio near 1; before the fetch left the issuer lock, one trickling issuer
took an unrelated sign from 0.12 s to 3.7 s).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import arguments, wrk  # noqa: E402 - after the path fix
from tests.fixtures.daemon import StaticServer, keyd, start, write_config  # noqa: E402
from tests.fixtures.jose import b64u  # noqa: E402


class TricklingJwks(StaticServer):
    """Answers the first request at once (keyd's start-up fetch), then, once
    ``trickle`` is set, drips a byte every 0.5 s."""

    def __init__(self) -> None:
        super().__init__()
        # Any well-formed key will do: the verifies ask for kids it lacks.
        from cryptography.hazmat.primitives.asymmetric import rsa

        numbers = rsa.generate_private_key(65537, 2048).public_key().public_numbers()
        self.body = json.dumps({"keys": [{
            "kty": "RSA", "kid": "known", "use": "sig", "alg": "PS256",
            "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(b"\x01\x00\x01")}]}).encode()
        self.stop = threading.Event()
        self.trickle = threading.Event()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if not self.trickle.is_set():
            super().answer(handler)
            return
        self.send_head(handler)
        try:
            for i in range(len(self.body)):
                handler.wfile.write(self.body[i:i + 1])
                handler.wfile.flush()
                if self.stop.wait(0.5):
                    return
        except OSError:
            return  # keyd gave up, as it should

    def close(self) -> None:
        self.stop.set()
        super().close()


def verify_storm(api_url: str, token: str, stop: threading.Event, callers: int) -> list[int]:
    """Callers asking for unknown kids of the trickling issuer until ``stop``."""
    counts = [0] * callers
    header = b64u(json.dumps({"alg": "PS256", "kid": "rotated"}).encode())
    compact = f"{header}.{b64u(b'x')}.{b64u(bytes(256))}"

    def run(i: int) -> None:
        with httpx.Client(base_url=api_url, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            while not stop.is_set():
                client.post("/v1/verify/jws", json={"jws": compact, "issuer": "trickle"})
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    return counts


def main() -> None:
    args = arguments(__doc__, seconds=8,
                     extra=lambda p: p.add_argument("--callers", type=int, default=48,
                                                   help="background verify callers"))

    jwks = TricklingJwks()
    try:
        with tempfile.TemporaryDirectory(prefix="keyd-bench-") as folder:
            config = write_config(Path(folder), {
                "lifecycle.transport": {"enabled": False}, "api": {"rate_limit": 0},
                "issuers.trickle": {"jwks_uri": jwks.url, "refetch_cooldown": "0s",
                                    "fetch_timeout": 5},
            })
            keyd(config, "init")
            token = keyd(config, "client", "add", "bench", "--policy", "service").stdout.strip()
            daemon = start(config)
            try:
                url = daemon.api_url + "/v1/sign/jws"
                wrk(url, token, 2, args.connections)  # warm-up
                quiet = wrk(url, token, args.seconds, args.connections)
                jwks.trickle.set()
                stop = threading.Event()
                counts = verify_storm(daemon.api_url, token, stop, args.callers)
                try:
                    wrk(url, token, 2, args.connections)  # let the storm build up
                    stormy = wrk(url, token, args.seconds, args.connections)
                finally:
                    stop.set()
            finally:
                daemon.stop()
    finally:
        jwks.close()
    result = {
        "benchmark": "sign p99 with and without a trickling issuer (local backend)",
        "quiet": quiet,
        "with_trickling_issuer": stormy,
        "background_verifies_answered": sum(counts),
        "p99_ratio": round(stormy["p99_ms"] / quiet["p99_ms"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
