"""What every benchmark in bench/ shares: wrk against a daemon, a timed loop
from N threads, `openssl speed`, a daemon on `[api] workers = "auto"`, and the
resident memory of its workers.  Each benchmark prints one JSON document with
a ratio against a reference measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.daemon import Daemon, keyd, start, write_config  # noqa: E402 - after the path fix

CONNECTIONS = 16  # p50/p99 are reported at this concurrency (issue 13)
SIGN_BODY = '{"payload": {"bench": "sign", "scope": "accounts", "n": 1}}'


def arguments(doc: str | None, *, seconds: int = 5,
              extra: Callable[[argparse.ArgumentParser], object] | None = None,
              ) -> argparse.Namespace:
    """Every benchmark's command line: --seconds, --connections, and its own ``extra``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--seconds", type=int, default=seconds)
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="wrk connections (p50/p99 are reported at 16)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def openssl_rsa2048(seconds: int) -> float:
    """RSA-2048 private-key operations per second on both cores (OpenSSL's own loop).

    A sign and an OAEP decryption are both one private-key operation, so this
    is the reference for sign/jws and for decrypt/jwe alike.
    """
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


def wrk(url: str, token: str | None, seconds: int, connections: int = CONNECTIONS, *,
        body: str | None = SIGN_BODY,
        ) -> dict[str, float]:
    """POST ``body`` (GET without one) to ``url`` for ``seconds``: rate, p50, p99, errors."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: `make setup` installs it (Debian package wrk)")
    lines = []
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}",
                  'wrk.headers["Content-Type"] = "application/json"']
    if token is not None:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(
            ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        Path(script.name).unlink()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if not rate:
        raise SystemExit(f"wrk printed no rate:\n{out}")
    return {
        "per_second": float(rate.group(1)),
        "p50_ms": _latency_ms(out, "50"),
        "p99_ms": _latency_ms(out, "99"),
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def timed_loop(make: Callable[[], Callable[[], object]], threads: int,
               seconds: float) -> dict[str, float]:
    """Call an operation from ``threads`` threads for ``seconds`` (``make`` builds
    each thread's operation, e.g. with its own client): rate, p50, p99, errors."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    go = threading.Event()
    deadline = [0.0]

    def worker(i: int) -> None:
        operation = make()
        go.wait()
        while (started := time.monotonic()) < deadline[0]:
            try:
                operation()
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
    if len(merged) < 2:
        raise SystemExit("the timed loop completed no operation")
    cuts = statistics.quantiles(merged, n=100)
    return {
        "per_second": round(len(merged) / elapsed, 1),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "errors": float(sum(errors)),
    }


def bare_uvicorn(app: str, path: str, seconds: int, connections: int = CONNECTIONS, *,
                 body: str | None = None) -> dict[str, float]:
    """wrk against ``bench/_bare_app.py``'s ``app`` on bare uvicorn, one worker a core."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"bench._bare_app:{app}", "--port", str(port),
         "--workers", str(len(os.sched_getaffinity(0))), "--no-access-log",
         "--log-level", "warning"],
        cwd=Path(__file__).resolve().parent.parent)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}{path}"
        sent = {} if body is None else {"body": body}
        wrk(url, None, 1, connections, **sent)  # warm-up
        return wrk(url, None, seconds, connections, **sent)
    finally:
        proc.terminate()
        proc.wait(15)


def worker_rss_mib(daemon: Daemon) -> list[float]:
    """Resident memory of each serving process (the workers; the process itself at 1)."""
    out = subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                         text=True).stdout.split()
    pids = [int(p) for p in out] or [daemon.proc.pid]
    sizes = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(round(int(line.split()[1]) / 1024, 1))
    return sizes


@contextmanager
def bench_daemon(folder: Path, tables: dict[str, dict[str, Any]] | None = None,
                 ) -> Iterator[tuple[Daemon, str]]:
    """keyd on every core (workers "auto"), rate limit off (one client is the
    whole load), init'ed, with a service client; yields it and its token."""
    settings: dict[str, dict[str, Any]] = {"lifecycle.transport": {"enabled": False}}
    for name, values in (tables or {}).items():
        settings.setdefault(name, {}).update(values)
    settings.setdefault("api", {}).update({"rate_limit": 0, "workers": "auto"})
    config = write_config(folder, settings)
    keyd(config, "init")
    token = keyd(config, "client", "add", "bench", "--policy", "service").stdout.strip()
    daemon = start(config)
    try:
        yield daemon, token
    finally:
        daemon.stop()


def report(name: str, result: dict[str, Any], reference_name: str, reference: float,
           ratio_target: float, **extra: Any) -> None:
    """Print the benchmark's JSON document with its ratio and whether it meets the target."""
    ratio = round(result["per_second"] / reference, 3)
    print(json.dumps({"benchmark": name, **result, reference_name: reference, **extra,
                      "ratio": ratio, "target": ratio_target, "met": ratio >= ratio_target},
                     indent=2), flush=True)
