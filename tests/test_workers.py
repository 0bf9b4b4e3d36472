"""`[api] workers`: several serving processes on one set of sockets, one parent.

The daemon is real (tests/daemon.py); which worker answers a connection is
the kernel's choice, so tests that need every worker open fresh connections
until each worker has been seen.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyd import config
from keyd.api.limits import RateLimiter, SharedBuckets
from keyd.errors import ConfigError, RateLimited
from tests.daemon import Daemon, keyd, running, start, write_config

pytestmark = pytest.mark.slow  # a real keyd process per test or module

WORKERS = 2
PATIENCE = 30.0  # seconds a test waits for something that must happen (never asserted on)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, {"api": {"workers": WORKERS},
                            "lifecycle.transport": {"enabled": False}}) as d:
        yield d


def children(daemon: Daemon) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                         text=True).stdout
    return {int(pid) for pid in out.split()}


def readyz_by_worker(daemon: Daemon) -> dict[int, dict[str, object]]:
    """/readyz of every worker: fresh connections until each one has answered."""
    seen: dict[int, dict[str, object]] = {}
    deadline = time.monotonic() + PATIENCE
    while len(seen) < WORKERS and time.monotonic() < deadline:
        answer = httpx.get(daemon.api_url + "/readyz").json()
        seen[int(str(answer["replica"]).rsplit(":", 1)[1])] = answer
    return seen


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_serve_one_jwks_and_one_of_them_leads(daemon: Daemon) -> None:
    """N workers under one parent, each serving the same JWKS (same ETag);
    the lease elects exactly one leader among them."""
    pids = children(daemon)
    assert len(pids) == WORKERS
    assert set(readyz_by_worker(daemon)) == pids  # every worker answers
    tags, bodies = set(), set()
    for _ in range(20):
        answer = httpx.get(daemon.public_url + "/jwks")
        assert answer.status_code == 200
        tags.add(answer.headers["etag"])
        bodies.add(answer.content)
    assert len(tags) == 1 and len(bodies) == 1
    deadline = time.monotonic() + PATIENCE
    leaders: list[int] = []
    while not leaders and time.monotonic() < deadline:
        leaders = [pid for pid, a in readyz_by_worker(daemon).items() if a["leader"]]
    assert len(leaders) == 1 and leaders[0] in pids


def test_a_killed_worker_is_replaced_and_sigterm_stops_all(daemon: Daemon) -> None:
    """SIGKILL one worker: a new one takes its place and the API keeps
    answering; then SIGTERM to the parent stops every process and cleans up."""
    before = children(daemon)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        now = children(daemon)
        if victim not in now and len(now) == WORKERS:
            break
        time.sleep(0.1)
    after = children(daemon)
    assert victim not in after and len(after) == WORKERS
    assert set(readyz_by_worker(daemon)) == after  # the new worker answers too
    with daemon.client(daemon.service_token) as client:
        for _ in range(6):
            assert client.post("/v1/sign/jws", json={"payload": {"n": 1}}).status_code == 200
    assert daemon.alive()

    daemon.stop(signal.SIGTERM)
    assert daemon.proc.returncode == 0
    assert not any(alive(pid) for pid in after)
    assert not (daemon.config.parent / "var" / "endpoints.json").exists()
    assert not daemon.socket.exists()


def test_a_clients_rate_limit_is_shared_by_the_workers(tmp_path: Path) -> None:
    """A client's burst is one allowance whichever worker its connection reaches."""
    burst = 10
    with running(tmp_path, {"api": {"workers": WORKERS, "rate_limit": 1, "rate_burst": burst},
                            "lifecycle.transport": {"enabled": False}}) as daemon:
        assert set(readyz_by_worker(daemon)) == children(daemon)
        started = time.monotonic()
        codes = [httpx.post(daemon.api_url + "/v1/sign/jws", json={"payload": {}},
                            headers={"Authorization": f"Bearer {daemon.service_token}"}
                            ).status_code for _ in range(4 * burst)]
        refilled = int(time.monotonic() - started) + 1  # one request a second comes back
    assert set(codes) == {200, 429}
    # Separate buckets would let each of the two workers grant a full burst.
    assert codes.count(200) <= burst + refilled


def test_shared_buckets_hold_one_allowance_across_processes() -> None:
    """Forked processes spending from one SharedBuckets grant the burst once in all."""
    buckets = SharedBuckets(slots=8)
    limiter = RateLimiter(rate=1e-6, burst=10, shared=buckets)
    readers = []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            granted = 0
            for _ in range(10):
                try:
                    limiter.take("svc-1")
                    granted += 1
                except RateLimited:
                    pass
            os.write(w, str(granted).encode())
            os._exit(0)
        os.close(w)
        readers.append((pid, r))
    total = 0
    for pid, r in readers:
        os.waitpid(pid, 0)
        total += int(os.read(r, 16))
        os.close(r)
    assert total == 10
    with pytest.raises(RateLimited):
        limiter.take("svc-1")
    limiter.take("another")  # another client has its own allowance


def test_shared_buckets_full_table_falls_back_to_a_per_process_bucket() -> None:
    limiter = RateLimiter(rate=1e-6, burst=1, shared=SharedBuckets(slots=1))
    limiter.take("a")
    limiter.take("b")  # no slot left: b gets this process's own bucket
    for caller in ("a", "b"):
        with pytest.raises(RateLimited):
            limiter.take(caller)


def test_the_parent_alone_speaks_to_systemd_ready_once_all_workers_serve(
        tmp_path: Path) -> None:
    """READY=1 once (from the parent, after every worker), then WATCHDOG=1, then STOPPING=1."""
    config = write_config(tmp_path, {"api": {"workers": WORKERS},
                                     "lifecycle.transport": {"enabled": False}})
    keyd(config, "init")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(PATIENCE)
        received: list[bytes] = []
        stopped = threading.Event()

        def listen() -> None:  # read at once, as systemd does: the parent never waits
            while not stopped.is_set():
                try:
                    received.append(notify.recv(4096))
                except TimeoutError:
                    return
                if received[-1] == b"STOPPING=1":
                    stopped.set()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        daemon = start(config, {"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                "WATCHDOG_USEC": "400000"})
        try:
            assert len(children(daemon)) == WORKERS
            assert httpx.get(daemon.public_url + "/jwks").status_code == 200
            deadline = time.monotonic() + PATIENCE
            while received.count(b"WATCHDOG=1") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            daemon.stop()
        listener.join(PATIENCE)
    assert received[0].decode().startswith(f"READY=1\nSTATUS={WORKERS} workers serving JWKS on ")
    assert received[-1] == b"STOPPING=1"
    # Nothing else: no worker's READY or heartbeat reaches systemd.
    assert set(received[1:-1]) == {b"WATCHDOG=1"} and len(received) >= 5


@pytest.mark.parametrize("value", [0, -1, "many", True, 1.5])
def test_workers_must_be_auto_or_a_positive_integer(value: object) -> None:
    with pytest.raises(ConfigError, match=r"\[api\] workers must be"):
        config.from_dict({"keyd": {"client_id": "c", "organisation": "o"},
                          "api": {"workers": value}}, Path("/etc/keyd/config.toml"))


def test_workers_auto_is_one_per_core() -> None:
    settings = config.from_dict({"keyd": {"client_id": "c", "organisation": "o"}},
                                Path("/etc/keyd/config.toml"))
    assert settings.api.workers == len(os.sched_getaffinity(0))


def test_workers_auto_is_one_on_an_hsm_unless_set() -> None:
    """On pkcs11 the token is the bottleneck: "auto" runs one process there,
    while an explicit count is obeyed."""
    base = {"keyd": {"client_id": "c", "organisation": "o"}, "backend": {"kind": "pkcs11"}}
    where = Path("/etc/keyd/config.toml")
    assert config.from_dict(base, where).api.workers == 1
    assert config.from_dict({**base, "api": {"workers": 3}}, where).api.workers == 3


WORKER_IMPORTS = """
import json, sys
from keyd import cli, config
from keyd.api.local import create_local_app
from keyd.api.public import create_public_app
from keyd.api.server import ListenerRouter, serve
from keyd.api.workers import supervise
from keyd.jobs import Jobs
from keyd.lease import Lease
from keyd.metrics import Metrics
from keyd.scheduler import Scheduler
from keyd.service import KeyService
service = KeyService.open(config.load(sys.argv[1]), require_backend=False)
service.init()
create_local_app(service, Metrics()), create_public_app(service)
service.close()
print(json.dumps(sorted(sys.modules)))
"""


def test_a_local_sqlite_worker_loads_no_other_backend_or_store_driver(tmp_path: Path) -> None:
    """What `keyd serve` imports into a worker on the local backend and SQLite:
    no hvac, no python-pkcs11, no PostgreSQL driver, no Alembic (no migration due)."""
    config_path = write_config(tmp_path, {"lifecycle.transport": {"enabled": False}})
    keyd(config_path, "init")
    out = subprocess.run([sys.executable, "-c", WORKER_IMPORTS, str(config_path)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    assert "keyd" in loaded and "cryptography" in loaded
    assert not loaded & {"hvac", "pkcs11", "psycopg", "psycopg2", "alembic"}


def test_a_console_session_is_honoured_by_every_worker(daemon: Daemon) -> None:
    """Signed in through one worker, the browser's next connections go to any of them."""
    from tests.test_console_http import csrf_of, signed_in

    assert len(readyz_by_worker(daemon)) == WORKERS
    with signed_in(daemon) as client:
        cookie = client.cookies["keyd-console"]
        csrf = client.headers["x-csrf"]
    pages = ["/console/", "/console/clients", "/console/audit", "/console/timeline"]
    for i in range(20):
        with httpx.Client(base_url=daemon.api_url, cookies={"keyd-console": cookie},
                          timeout=30) as fresh:  # a new connection each time
            answer = fresh.get(pages[i % len(pages)])
            assert answer.status_code == 200, (i, answer.status_code, answer.headers)
            assert csrf_of(answer.text) == csrf  # the same session, whichever worker
    # Sign-out through one worker ends the session for all of them.
    with httpx.Client(base_url=daemon.api_url, cookies={"keyd-console": cookie},
                      timeout=30) as fresh:
        assert fresh.post("/console/sign-out", data={"csrf": csrf}).status_code == 200
    for _ in range(10):
        replay = httpx.get(daemon.api_url + "/console/", cookies={"keyd-console": cookie})
        assert replay.status_code == 303
