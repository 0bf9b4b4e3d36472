"""sd_notify(3) without libsystemd: readiness, status and the watchdog.

Under ``Type=notify`` systemd hands keyd ``$NOTIFY_SOCKET``, an AF_UNIX
datagram socket (a path, or an abstract name written ``@name``).  keyd sends
``READY=1`` once its keys and listeners are up, ``STOPPING=1`` on the way
down, and, when the unit sets ``WatchdogSec=``, a ``WATCHDOG=1`` heartbeat.

The heartbeat is only worth something if it stops when keyd is wedged, so
:func:`start_watchdog` sends it only while a ``healthy()`` probe says yes;
:func:`loop_responds` is that probe for an asyncio event loop (a loop stuck
in a blocking call cannot run a callback, so the heartbeat stops and systemd
restarts keyd).  Outside systemd every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("keyd.notify")


def _address(value: str) -> str | None:
    """The socket address sd_notify would use, or None for one it would not."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of the '@' (Linux only).
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd only ever hands out absolute paths or abstract names; anything
    # else (relative paths, vsock: on newer systemd) we do not speak.
    log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; ignored", value)
    return None


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; a no-op when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None, *,
                 blocking: bool = True) -> None:
        env = os.environ if environ is None else environ
        # A process whose one loop sends (the workers' parent) must never wait
        # on a receiver's full queue: it drops the datagram and logs it instead.
        self._flags = 0 if blocking else socket.MSG_DONTWAIT
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()  # the watchdog thread and the loop both send

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True when it was sent.

        A failure is logged, never raised: losing contact with systemd must
        not take signing down (systemd's own timeouts handle a silent keyd).
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        with self._lock:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                    s.sendto(message, self._flags, self.address)
            except OSError as e:
                log.warning("sd_notify to %r failed: %s", self.address, e.strerror or e)
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between heartbeats (half of WatchdogSec), or None when off.

        ``$WATCHDOG_PID``, when set, names the process the watchdog is meant
        for; a child that inherited the environment must not feed it.
        """
        if self.address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        # sd_watchdog_enabled(3) recommends pinging at half the interval.
        return usec / 1_000_000 / 2


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram (e.g. READY=1
    # smuggled in through a status text), so a status stays one line.
    return " ".join(text.splitlines())


class Watchdog:
    """A running heartbeat; ``stop()`` ends it.  ``thread`` is None when off."""

    def __init__(self, thread: threading.Thread | None, stop_event: threading.Event) -> None:
        self.thread = thread
        self._stop = stop_event

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, wait: float = 0.0) -> None:
        """End the heartbeat; with ``wait`` > 0, also wait that long for the thread.

        The default does not wait: stop() is called from the event loop, and
        a probe in flight is waiting for that very loop to run its callback.
        """
        self._stop.set()
        if wait > 0 and self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(wait)


def start_watchdog(notifier: Notifier, healthy: Callable[[], bool]) -> Watchdog:
    """Send WATCHDOG=1 every interval while ``healthy()`` holds.

    When ``healthy()`` is false (or raises) the beat is withheld: systemd
    then sees the watchdog expire and restarts keyd, which is the point.
    """
    stop = threading.Event()
    interval = notifier.watchdog_interval()
    if interval is None:
        return Watchdog(None, stop)

    def beat() -> None:
        while True:
            try:
                ok = healthy()
            except Exception:  # noqa: BLE001 - a failing probe means "not healthy", not a dead thread
                log.exception("watchdog health probe failed")
                ok = False
            if stop.is_set():  # stopped while probing: keyd is shutting down
                return
            if ok:
                notifier.watchdog()
            else:
                log.warning("watchdog: keyd is not healthy; heartbeat withheld")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="keyd-watchdog", daemon=True)
    thread.start()
    return Watchdog(thread, stop)


def loop_responds(loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> Callable[[], bool]:
    """A health probe: True when ``loop`` runs a callback within ``timeout`` seconds."""

    def healthy() -> bool:
        ran = threading.Event()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:  # the loop is closed
            return False
        return ran.wait(timeout)

    return healthy
