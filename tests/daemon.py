"""Run the real daemon for tests: a config in a temp folder, `keyd init`,
`keyd client add`, then `keyd serve` as a subprocess on ports chosen by the
kernel; the test talks to it over real sockets.

The set-up commands run `keyd.cli.main` in the test's own process (the same
code, without 1.8 s of imports per call); `serve`, and any command given an
environment of its own, run as a real process."""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx

KEYD = [sys.executable, "-m", "keyd.cli"]
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (PR_SET_PDEATHSIG),
    so a killed xdist worker leaves no daemon behind (tests/test_clean_exit.py)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the
# process: a daemon started from a short-lived thread (a restart loop in a
# test) would get SIGTERM as soon as that thread returned.  Every daemon is
# therefore forked by this one thread, which lives as long as the test process.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daemon-spawner")


def spawn(args: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``args`` as a child that dies with the test process, forked by the spawner thread."""
    return _spawner.submit(
        subprocess.Popen, args, stdout=log, stderr=subprocess.STDOUT, env=env,
        preexec_fn=die_with_parent,
    ).result()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(folder: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """A config.toml in ``folder``: the test defaults, overridden per table."""
    base: dict[str, dict[str, Any]] = {
        "keyd": {
            "mode": "sandbox",
            "data_dir": "var",
            "client_id": "test-client-0001",
            "organisation": "Test Participant Sdn Bhd",
            "policies_dir": str(REPO / "policies"),
        },
        "public": {"listen": "127.0.0.1:0", "max_age": 300},
        # One process unless a test asks for workers (tests/test_workers.py).
        "api": {"listen": "127.0.0.1:0", "socket": "var/keyd.sock", "workers": 1},
        "backend": {"kind": "local"},
    }
    for name, values in tables.items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(k) if '#' in k else k} = {toml_value(v)}"
                     for k, v in values.items())
        lines.append("")
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path


# The loggers keyd.cli.main and keyd.logs.setup_logging configure, besides the root.
_CLI_LOGGERS = ("alembic", "apscheduler", "uvicorn", "uvicorn.error", "uvicorn.access")


@contextmanager
def cli_isolated() -> Iterator[None]:
    """Put back what ``keyd.cli.main`` changes in its process, for an in-process call.

    A process runs main once; a test process runs it many times, so the
    redacting handler it adds (bound to that call's stderr), the log levels,
    the umask and the environment are restored.  (main stops every thread it
    starts: tests/test_cli.py checks that where no other thread runs; here a
    test's own TCP proxy may still be closing the CLI's connections.)
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: (lg.level, list(lg.handlers), lg.propagate)
             for name in _CLI_LOGGERS for lg in [logging.getLogger(name)]}
    umask = os.umask(0o077)
    os.umask(umask)
    environ = dict(os.environ)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)
        for name, (lg_level, lg_handlers, propagate) in named.items():
            lg = logging.getLogger(name)
            lg.setLevel(lg_level)
            lg.handlers[:] = lg_handlers
            lg.propagate = propagate
        os.umask(umask)
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)


_in_process = threading.Lock()  # stdout and stderr are the process's: one call at a time


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``keyd.cli.main(argv)`` in this process: exit status, stdout, stderr."""
    from keyd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _in_process, cli_isolated(), redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def keyd(config: Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True, process: bool = False) -> subprocess.CompletedProcess[str]:
    """`keyd --config CONFIG ARGS...`: in this process, or as a real one when
    ``process`` is set or ``env`` is given (SoftHSM2 reads $SOFTHSM2_CONF once
    per process, so a token of its own needs a process of its own)."""
    argv = ["--config", str(config), *args]
    if process or env:
        result = subprocess.run(
            [*KEYD, *argv],
            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
        )
    else:
        result = subprocess.CompletedProcess(["keyd", *argv], *run_main(argv))
    if check and result.returncode != 0:
        raise AssertionError(f"keyd {' '.join(args)} failed: {result.stderr}")
    return result


@dataclass
class Daemon:
    config: Path
    proc: subprocess.Popen[bytes]
    public_url: str
    api_url: str
    socket: Path
    admin_token: str
    service_token: str
    env: dict[str, str] = field(default_factory=dict)
    log: Any = None  # the daemon's output file, closed when it stops

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=30, **kwargs)

    def socket_client(self, token: str) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(base_url="http://keyd", transport=transport, timeout=30,
                            headers={"Authorization": f"Bearer {token}"})

    def public(self) -> httpx.Client:
        return httpx.Client(base_url=self.public_url, timeout=30)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        return self.alive() and httpx.get(self.api_url + "/healthz").status_code == 200

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


def start(config: Path, env: dict[str, str] | None = None, *,
          admin_token: str = "", service_token: str = "") -> Daemon:
    """`keyd serve` on ``config``; returns once endpoints.json says it is up."""
    data_dir = config.parent / "var"
    endpoints = data_dir / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    log = open(config.parent / "keyd.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = spawn([*KEYD, "--config", str(config), "serve"], log, {**os.environ, **(env or {})})
    ready = threading.Event()

    def wait() -> None:
        # Poll endpoints.json; the daemon writes it once its sockets accept.
        while proc.poll() is None and not endpoints.exists():
            ready.wait(0.05)
        ready.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(START_TIMEOUT)
    if not endpoints.exists():
        proc.kill()
        proc.wait()
        log.close()
        raise AssertionError("keyd serve did not start:\n" +
                             (config.parent / "keyd.log").read_text()[-3000:])
    addresses = json.loads(endpoints.read_text())
    return Daemon(
        config=config,
        proc=proc,
        public_url=f"http://{addresses['public']}",
        api_url=f"http://{addresses['api']}",
        socket=Path(addresses["socket"]),
        admin_token=admin_token,
        service_token=service_token,
        env=env or {},
        log=log,
    )


@contextmanager
def running(folder: Path, tables: dict[str, dict[str, Any]] | None = None,
            env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """init + an admin and a service client + serve; stopped afterwards."""
    config = write_config(folder, tables or {})
    keyd(config, "init", env=env)
    admin = keyd(config, "client", "add", "admin-1", "--policy", "admin", env=env).stdout.strip()
    service = keyd(config, "client", "add", "svc-1", "--policy", "service",
                   env=env).stdout.strip()
    daemon = start(config, env, admin_token=admin, service_token=service)
    try:
        yield daemon
    finally:
        daemon.stop()


class StaticServer:
    """A loopback HTTP server answering GET with whatever the test sets."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests += 1
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
