"""`keyd serve` speaks sd_notify to a real datagram socket standing in for
systemd: READY=1 once it serves, WATCHDOG=1 heartbeats, STOPPING=1."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.daemon import keyd, start, write_config

pytestmark = pytest.mark.slow  # a real keyd process per test or module


def test_serve_sends_ready_once_serving_then_heartbeats_then_stopping(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    keyd(config, "init")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000",
               "KEYD_LOG_FORMAT": "json"}
        daemon = start(config, env)
        try:
            ready = notify.recv(4096).decode()
            assert ready.startswith("READY=1\nSTATUS=serving JWKS on "), ready
            # READY=1 follows the listeners accepting: the JWKS answers now.
            assert httpx.get(daemon.public_url + "/jwks").status_code == 200
            assert [notify.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        finally:
            daemon.stop()
        after_stop = [notify.recv(4096)]
        while after_stop[-1] == b"WATCHDOG=1":  # a beat may race the SIGTERM
            after_stop.append(notify.recv(4096))
        assert after_stop[-1] == b"STOPPING=1"
    entries = [json.loads(line) for line in (tmp_path / "keyd.log").read_text().splitlines()]
    assert any(e["logger"] == "keyd.server" and e["msg"].startswith("serving JWKS")
               for e in entries)
