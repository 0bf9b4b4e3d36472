"""`[api] workers`: one parent supervising N serving processes on one set of sockets.

The parent binds every listener (so port 0 and endpoints.json keep working)
and holds the data_dir lock, then forks the workers, which inherit both.  The
kernel spreads the accepted connections over the workers blocked in accept.

Each worker speaks sd_notify to its parent, not to systemd: its
``$NOTIFY_SOCKET`` is an abstract datagram socket the parent reads, one per
worker slot.  The parent tells systemd READY=1 once every worker has said it,
feeds systemd's watchdog from its own loop, kills a worker whose heartbeat
stopped (a wedged event loop) and forks a new one for any worker that dies.
SIGTERM/SIGINT are forwarded; the parent leaves once no worker is left.

The parent runs no threads, so forking a replacement later is safe.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from keyd.api.limits import SharedBuckets
from keyd.notify import Notifier

log = logging.getLogger("keyd.workers")

STOP_GRACE = 20.0  # seconds the workers get to finish after SIGTERM, then SIGKILL
# A starting worker opens the store and the backend before its first beat; on
# a busy host that can outlast a short watchdog, and killing it there would
# stop the whole daemon.  systemd's TimeoutStartSec bounds a start that hangs.
START_GRACE = 60.0
RESTART_PAUSE = (0.1, 5.0)  # a worker that keeps dying is restarted ever more slowly


@dataclass
class Worker:
    """What a worker process receives from its parent."""

    slot: int
    buckets: SharedBuckets  # the rate-limit table all workers share


@dataclass
class _Slot:
    number: int
    channel: socket.socket  # the worker's $NOTIFY_SOCKET, read by the parent
    address: str
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    beat: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a parent killed with SIGKILL takes its workers along.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, count: int, run_worker: Callable[[Worker], int],
                 endpoints: dict[str, Any], endpoints_file: Path,
                 cleanup: Callable[[], None]) -> None:
        self.count, self.run_worker = count, run_worker
        self.endpoints, self.endpoints_file, self.cleanup = endpoints, endpoints_file, cleanup
        self.notifier = Notifier(blocking=False)  # systemd's, if any: only the parent speaks
        self.interval = self.notifier.watchdog_interval()
        self.buckets = SharedBuckets()
        tag = f"keyd-{os.getpid()}-{secrets.token_hex(4)}"
        self.slots = [self._channel(n, f"@{tag}-{n}") for n in range(count)]
        self.stopping = False
        self.announced = False
        self.exit_code = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @staticmethod
    def _channel(number: int, address: str) -> _Slot:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("\0" + address[1:])
        sock.setblocking(False)
        return _Slot(number, sock, address)

    # -- the parent's loop -------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            for slot in self.slots:
                self._spawn(slot)
            last_ping = 0.0
            while True:
                self._reap()
                if self.stopping and not any(s.pid for s in self.slots):
                    break
                now = time.monotonic()
                self._restart_due(now)
                if not self.announced and not self.stopping and all(
                        s.ready for s in self.slots):
                    self._announce()
                if self.interval is not None and not self.stopping:
                    self._kill_wedged(now)
                    if self.announced and now - last_ping >= self.interval:
                        self.notifier.watchdog()
                        last_ping = now
                self._wait(0.5 if self.interval is None else min(0.5, self.interval / 2))
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            for slot in self.slots:
                slot.channel.close()
            self.endpoints_file.unlink(missing_ok=True)
            self.cleanup()
        return self.exit_code

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            self.stop(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopping = True
        self.notifier.stopping()
        self._stop_deadline = time.monotonic() + STOP_GRACE
        for slot in self.slots:
            slot.restart_at = None
            self._kill(slot, sig)

    def _kill(self, slot: _Slot, sig: int) -> None:
        if slot.pid:
            try:
                os.kill(slot.pid, sig)
            except ProcessLookupError:
                pass

    def _wait(self, timeout: float) -> None:
        readers = [self._wake_r] + [s.channel for s in self.slots]
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for slot in self.slots:
            if slot.channel in ready:
                self._read(slot)
        if self.stopping and time.monotonic() > self._stop_deadline:
            for slot in self.slots:
                if slot.pid:
                    log.warning("worker %d (pid %d) still running %g s after the stop; "
                                "killed", slot.number, slot.pid, STOP_GRACE)
                    self._kill(slot, signal.SIGKILL)

    def _read(self, slot: _Slot) -> None:
        while True:
            try:
                message = slot.channel.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return
            for line in message.splitlines():
                if line == "READY=1" and slot.pid:
                    slot.ready, slot.beat, slot.failures = True, time.monotonic(), 0
                elif line == "WATCHDOG=1":
                    slot.beat = time.monotonic()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            was_ready, slot.pid, slot.ready = slot.ready, 0, False
            if self.stopping:
                continue
            if not self.announced and not was_ready:
                # A worker that cannot start (bad key, backend down) will not
                # start on a second try either: the daemon fails as a whole.
                log.error("worker %d exited with %d before it was ready; stopping", slot.number,
                          code)
                self.exit_code = code if code > 0 else 1
                self.stop()
                continue
            slot.failures += 1
            pause = min(RESTART_PAUSE[1], RESTART_PAUSE[0] * 2 ** (slot.failures - 1))
            log.warning("worker %d (pid %d) exited with %d; restarting it in %g s",
                        slot.number, pid, code, pause)
            slot.restart_at = time.monotonic() + pause

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                slot.restart_at = None
                self._spawn(slot)

    def _kill_wedged(self, now: float) -> None:
        assert self.interval is not None
        # A worker beats every interval (half of WatchdogSec); four missed
        # beats is a loop that no longer runs.  Start-up gets START_GRACE at least.
        for slot in self.slots:
            allowed = 4 * self.interval if slot.ready else max(4 * self.interval, START_GRACE)
            if slot.pid and now - max(slot.beat, slot.started) > allowed:
                log.error("worker %d (pid %d) stopped answering its watchdog; killed",
                          slot.number, slot.pid)
                self._kill(slot, signal.SIGKILL)
                slot.beat = now

    def _announce(self) -> None:
        self.announced = True
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.endpoints))
        tmp.replace(self.endpoints_file)
        log.info("%d workers serving JWKS on http://%s, local API on %s", self.count,
                 self.endpoints["public"],
                 ", ".join(str(v) for k, v in self.endpoints.items() if k != "public"))
        self.notifier.ready(f"{self.count} workers serving JWKS on {self.endpoints['public']}")

    # -- a worker's start ----------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.ready, slot.started, slot.beat = False, time.monotonic(), 0.0
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            slot.pid = pid
            return
        code = 1
        try:
            _die_with_parent()
            signal.set_wakeup_fd(-1)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for other in self.slots:
                other.channel.close()
            os.environ["NOTIFY_SOCKET"] = slot.address
            if self.interval is not None:
                os.environ["WATCHDOG_USEC"] = str(int(self.interval * 2 * 1_000_000))
                os.environ["WATCHDOG_PID"] = str(os.getpid())
            else:
                os.environ.pop("WATCHDOG_USEC", None)
                os.environ.pop("WATCHDOG_PID", None)
            code = self.run_worker(Worker(slot.number, self.buckets))
        except BaseException as e:  # noqa: BLE001 - a worker never returns into the parent's code
            if not isinstance(e, KeyboardInterrupt | SystemExit):
                print(f"keyd: worker {slot.number}: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(code)


def supervise(count: int, run_worker: Callable[[Worker], int], endpoints: dict[str, Any],
              endpoints_file: Path, cleanup: Callable[[], None]) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; the exit code for the daemon."""
    return Supervisor(count, run_worker, endpoints, endpoints_file, cleanup).run()

