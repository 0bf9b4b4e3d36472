"""sd_notify over a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.notify import Notifier, loop_responds, start_watchdog

WAIT = 5.0  # bound on any single receive; the tests never sleep


class Systemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(WAIT)
        self.env = {"NOTIFY_SOCKET": env_value}

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(WAIT)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    path = tmp_path / "notify"
    s = Systemd(str(path), str(path))
    yield s
    s.close()


@pytest.fixture
def abstract_systemd() -> Iterator[Systemd]:
    name = f"keyd-test-{uuid.uuid4().hex}"
    s = Systemd("\0" + name, "@" + name)
    yield s
    s.close()


def test_ready_sends_ready_and_status_in_one_datagram(systemd: Systemd) -> None:
    assert Notifier(systemd.env).ready("serving JWKS on 127.0.0.1:8080")
    assert systemd.receive() == "READY=1\nSTATUS=serving JWKS on 127.0.0.1:8080"


def test_status_stopping_and_watchdog_datagrams_are_exact(systemd: Systemd) -> None:
    n = Notifier(systemd.env)
    n.status("rotating signing key")
    n.stopping()
    n.watchdog()
    assert [systemd.receive() for _ in range(3)] == [
        "STATUS=rotating signing key", "STOPPING=1", "WATCHDOG=1"]


def test_a_newline_in_a_status_cannot_smuggle_another_assignment(systemd: Systemd) -> None:
    Notifier(systemd.env).status("ok\nREADY=1")
    assert systemd.receive() == "STATUS=ok READY=1"


def test_abstract_socket_names_are_reached(abstract_systemd: Systemd) -> None:
    assert Notifier(abstract_systemd.env).ready("up")
    assert abstract_systemd.receive() == "READY=1\nSTATUS=up"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready("up") and not n.watchdog() and not n.stopping()
    assert n.watchdog_interval() is None
    assert start_watchdog(n, lambda: True).thread is None


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and n.ready("up") is False


def test_a_relative_notify_socket_is_ignored() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "relative/notify"}).enabled


def test_watchdog_interval_is_half_of_watchdog_usec(systemd: Systemd) -> None:
    env = {**systemd.env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval() == 15.0


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_is_off_without_a_positive_interval(systemd: Systemd, usec: str) -> None:
    assert Notifier({**systemd.env, "WATCHDOG_USEC": usec}).watchdog_interval() is None


def test_watchdog_meant_for_another_pid_is_disabled(systemd: Systemd) -> None:
    env = {**systemd.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}
    n = Notifier(env)
    assert n.watchdog_interval() is None
    dog = start_watchdog(n, lambda: True)
    assert dog.thread is None
    assert systemd.nothing_within(0.5)


def test_healthy_process_sends_heartbeats_until_stopped(systemd: Systemd) -> None:
    env = {**systemd.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    dog = start_watchdog(Notifier(env), lambda: True)
    try:
        assert [systemd.receive() for _ in range(4)] == ["WATCHDOG=1"] * 4
    finally:
        dog.stop(wait=WAIT)
    assert not dog.running
    while not systemd.nothing_within(0.3):  # drain a beat sent just before stop
        pass
    assert systemd.nothing_within(0.5)


def test_unhealthy_process_gets_no_heartbeat_and_recovers_when_healthy(
    systemd: Systemd,
) -> None:
    healthy = threading.Event()
    probed = threading.Event()

    def probe() -> bool:
        probed.set()
        return healthy.is_set()

    dog = start_watchdog(Notifier({**systemd.env, "WATCHDOG_USEC": "200000"}), probe)
    try:
        assert probed.wait(WAIT)
        assert systemd.nothing_within(0.6)  # six intervals, not one beat
        healthy.set()
        assert systemd.receive() == "WATCHDOG=1"
    finally:
        dog.stop()


def test_a_probe_that_raises_counts_as_unhealthy(systemd: Systemd) -> None:
    raised = threading.Event()

    def probe() -> bool:
        raised.set()
        raise RuntimeError("backend probe blew up")

    dog = start_watchdog(Notifier({**systemd.env, "WATCHDOG_USEC": "200000"}), probe)
    try:
        assert raised.wait(WAIT)
        assert systemd.nothing_within(0.5)
        assert dog.running
    finally:
        dog.stop()


def test_loop_probe_is_true_for_a_running_loop_and_false_for_a_blocked_one() -> None:
    loop = asyncio.new_event_loop()
    release = threading.Event()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        probe = loop_responds(loop, timeout=0.3)
        assert probe() is True
        loop.call_soon_threadsafe(release.wait, WAIT)  # wedge the loop in a blocking call
        assert probe() is False
        release.set()
        assert loop_responds(loop, timeout=WAIT)() is True
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(WAIT)
        loop.close()
    assert probe() is False  # a closed loop is not healthy


def test_stop_returns_at_once_while_a_probe_is_in_flight_and_no_beat_follows(
    systemd: Systemd,
) -> None:
    probing, release = threading.Event(), threading.Event()

    def probe() -> bool:
        probing.set()
        release.wait(WAIT)  # like loop_responds waiting on the loop that is calling stop()
        return True

    dog = start_watchdog(Notifier({**systemd.env, "WATCHDOG_USEC": "200000"}), probe)
    assert probing.wait(WAIT)
    dog.stop()
    assert dog.running  # stop() did not wait for the probe
    release.set()
    assert dog.thread is not None
    dog.thread.join(WAIT)
    assert not dog.running
    assert systemd.nothing_within(0.3)  # the probe's late "healthy" sent nothing
