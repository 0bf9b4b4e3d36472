"""`keyd serve`: the public JWKS listener, the local API on loopback TCP and on
the unix socket, all in one uvicorn server and one event loop per process
(``[api] workers`` such processes share the sockets: keyd/api/workers.py).

keyd binds the sockets itself, so a port of 0 works (tests) and the real
addresses are written to ``<data_dir>/endpoints.json`` once serving.  One
ASGI app routes each connection by the socket it arrived on: the public
socket reaches only the JWKS app, everything else the local API.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from keyd.api.local import create_local_app
from keyd.api.protocol import guarded_protocol
from keyd.api.public import create_public_app
from keyd.api.workers import Worker
from keyd.config import Listen, Settings
from keyd.errors import ConfigError
from keyd.metrics import Metrics
from keyd.notify import Notifier, Watchdog, loop_responds, start_watchdog
from keyd.service import KeyService

log = logging.getLogger("keyd.server")


class ListenerRouter:
    """Send each connection to the app of the listener it came in on."""

    def __init__(self, public: ASGIApp, local: ASGIApp, public_port: int) -> None:
        self.public, self.local, self.public_port = public, local, public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        on_public = server is not None and server[1] == self.public_port
        await (self.public if on_public else self.local)(scope, receive, send)


def _bind_tcp(listen: Listen, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted
    # sockets whose proto says TCP, and without it Nagle + delayed ACK add
    # ~40 ms to every response.  Set it on the listener too (inherited).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"{what}: cannot listen on {listen}: {e.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _bind_unix(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        # A stale socket from an earlier run is removed; a live one (another
        # keyd answers on it) or anything that is not a socket never is.
        if not path.is_socket():
            raise ConfigError(f"[api] socket: {path} exists and is not a socket")
        if _socket_alive(path):
            raise ConfigError(f"[api] socket: {path} is in use by a running process; "
                              "not removed")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: only keyd's user connects
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ConfigError(f"[api] socket: cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody listens: stale
    except OSError:
        return True  # e.g. a full backlog: someone listens
    finally:
        probe.close()
    return True


def lock_data_dir(settings: Settings) -> int:
    """Hold ``<data_dir>/serve.lock`` for the daemon's life: one daemon per data_dir.

    The kernel drops the lock when the process exits, however it exits; the
    file keeps the holder's pid for the message a second daemon prints.
    """
    data_dir = settings.keyd.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"[keyd] data_dir {data_dir} is in use by keyd pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def bind_listeners(settings: Settings) -> tuple[list[socket.socket], dict[str, Any]]:
    public = _bind_tcp(settings.public.listen, "[public] listen")
    sockets = [public]
    endpoints: dict[str, Any] = {"public": _address(public)}
    if settings.api.listen is not None:
        local = _bind_tcp(settings.api.listen, "[api] listen")
        sockets.append(local)
        endpoints["api"] = _address(local)
    if settings.api.socket is not None:
        sockets.append(_bind_unix(settings.api.socket))
        endpoints["socket"] = str(settings.api.socket)
    return sockets, endpoints


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's Server, with keyd's shutdown.

    uvicorn re-raises SIGTERM/SIGINT once it has shut down, to mimic the
    default action; that kills keyd before its own cleanup runs (scheduler
    stop, audit flush, socket and endpoints.json removal).  keyd exits
    normally instead, and tells systemd STOPPING=1 as soon as a signal arrives.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], object]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {s: signal.signal(s, self.handle_exit)
                     for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in originals.items():
                signal.signal(s, handler)


Listeners = tuple[list[socket.socket], dict[str, Any]]


def serve(service: KeyService, listeners: Listeners | None = None,
          worker: Worker | None = None) -> None:
    """Serve until a signal; ``listeners`` from bind_listeners() (bound here if None).

    As one of several ``worker``s, the parent owns endpoints.json and the
    socket file, and this process's sd_notify goes to the parent.
    """
    settings = service.settings
    sockets, endpoints = listeners if listeners is not None else bind_listeners(settings)
    inode = socket_inode(settings)
    public_port = sockets[0].getsockname()[1]
    metrics = Metrics()
    app = ListenerRouter(
        create_public_app(service),
        create_local_app(service, metrics, None if worker is None else worker.buckets),
        public_port
    )
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        # Loopback and a unix socket, no proxy in front: X-Forwarded-* are not
        # trusted, and their middleware is not run on every request.
        proxy_headers=False,
        date_header=False,
        http=guarded_protocol(
            settings.api.header_timeout.total_seconds(), settings.api.max_header_bytes
        ),
        timeout_keep_alive=30,
    )
    notifier = Notifier()  # $NOTIFY_SOCKET under systemd; a no-op without it
    server = _Server(config, on_exit=notifier.stopping)
    endpoints_file = settings.keyd.data_dir / "endpoints.json"

    async def run() -> None:
        serving = asyncio.ensure_future(server.serve(sockets=sockets))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started and worker is None:
            tmp = endpoints_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(endpoints))
            tmp.replace(endpoints_file)
            log.info("serving JWKS on http://%s, local API on %s", endpoints["public"],
                     ", ".join(str(v) for k, v in endpoints.items() if k != "public"))
        watchdog: Watchdog | None = None
        if server.started:
            # KeyService.open loaded the keys and every listener accepts: ready.
            notifier.ready(f"serving JWKS on {endpoints['public']}")
            if worker is not None:
                log.info("worker %d serving", worker.slot)
            # Heartbeat only while this loop answers, so a wedged loop is restarted.
            watchdog = start_watchdog(notifier, loop_responds(asyncio.get_running_loop()))
        try:
            await serving
        finally:
            if watchdog is not None:
                watchdog.stop()

    try:
        # uvloop where installed (uvicorn's "auto" choice), else asyncio.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(run())
    finally:
        if worker is None:
            release_listeners(settings, inode)


def socket_inode(settings: Settings) -> int | None:
    return settings.api.socket.stat().st_ino if settings.api.socket is not None else None


def release_listeners(settings: Settings, inode: int | None) -> None:
    """On the way out: endpoints.json and our own socket file go."""
    (settings.keyd.data_dir / "endpoints.json").unlink(missing_ok=True)
    if settings.api.socket is not None:
        _unlink_own_socket(settings.api.socket, inode)


def _unlink_own_socket(path: Path, inode: int | None) -> None:
    """Remove the socket we bound, never one another process bound there since."""
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
