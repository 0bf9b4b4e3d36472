"""Benchmark: POST /v1/sign/jws over loopback, driven by wrk, against
`openssl speed -multi 2 rsa2048` measured in the same run.

    .venv/bin/python bench/sign_jws.py [--seconds 10] [--connections 32] [--backend local]

Prints sign/s, p50/p99 latency and the ratio keyd/openssl.  The target for
the local backend is a ratio of at least 0.5 (SPEC "Performance").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import keyd, start, write_config  # noqa: E402 - after the path fix

LUA = """
wrk.method = "POST"
wrk.body   = '{"payload": {"bench": "sign", "scope": "accounts", "n": 1}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def openssl_signs_per_second(seconds: int) -> float:
    """RSA-2048 private-key operations per second on both cores (OpenSSL's own loop)."""
    out = subprocess.run(
        ["openssl", "speed", "-multi", "2", "-seconds", str(seconds), "rsa2048"],
        capture_output=True, text=True, check=True,
    ).stdout
    # "rsa 2048 bits 0.000330s 0.000010s   3030.3  100000.0" -> sign/s is the 3rd number
    for line in out.splitlines():
        m = re.match(r"\s*rsa\s+2048 bits\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)", line)
        if m:
            return float(m.group(3))
    raise SystemExit(f"could not read openssl speed output:\n{out}")


def _latency_ms(text: str, percentile: str) -> float:
    m = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not m:
        raise SystemExit(f"wrk printed no {percentile}% latency:\n{text}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, token: str, seconds: int, connections: int) -> dict[str, float]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `make setup` installs it (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % token)
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
         "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout
    Path(script.name).unlink()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if not rate:
        raise SystemExit(f"wrk printed no rate:\n{out}")
    return {
        "signs_per_second": float(rate.group(1)),
        "p50_ms": _latency_ms(out, "50"),
        "p99_ms": _latency_ms(out, "99"),
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    # The reference is taken before and after keyd's run and averaged, so a
    # change in the machine's load during the run moves both sides alike.
    before = openssl_signs_per_second(min(args.seconds, 5))
    with tempfile.TemporaryDirectory(prefix="keyd-bench-") as folder:
        # One client is the whole load here, so the per-client rate limit is off.
        config = write_config(Path(folder), {"lifecycle.transport": {"enabled": False},
                                             "api": {"rate_limit": 0, "workers": "auto"}})
        keyd(config, "init")
        token = keyd(config, "client", "add", "bench", "--policy", "service").stdout.strip()
        daemon = start(config)
        try:
            wrk(daemon.api_url + "/v1/sign/jws", token, 2, args.connections)  # warm-up
            keyd_result = wrk(daemon.api_url + "/v1/sign/jws", token, args.seconds,
                              args.connections)
        finally:
            daemon.stop()
    reference = (before + openssl_signs_per_second(min(args.seconds, 5))) / 2
    result = {
        "benchmark": "POST /v1/sign/jws (local backend, RSA-2048 PS256)",
        **keyd_result,
        "openssl_speed_multi2_rsa2048_signs_per_second": reference,
        "ratio": round(keyd_result["signs_per_second"] / reference, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
