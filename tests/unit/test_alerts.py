"""Expiry alerts over real channels: an aiosmtpd SMTP server and a loopback
HTTP webhook receiver that checks keyd's detached JWS against keyd's JWKS."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message
from joserfc import jws
from joserfc.jwk import KeySet

from keyd.alerts import Alert
from keyd.clock import SettableClock
from keyd.jobs import Jobs
from keyd.model import Purpose
from keyd.service import KeyService
from tests.fixtures.daemon import keyd, write_config
from tests.fixtures.service import T0, open_service
from tests.fixtures.webhook import Webhook


class Inbox(Message):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []

    def handle_message(self, message: Any) -> None:
        self.messages.append(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(fail=1)
    try:
        yield hook
    finally:
        hook.close()


def channels(hook: Webhook, smtp_port: int) -> dict[str, dict[str, Any]]:
    return {
        "alerts.webhook": {"url": hook.url, "retries": 3, "backoff": "1s"},
        "alerts.smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "keyd@example.test",
                        "to": ["secops@example.test"], "starttls": False},
    }


def open_with_channels(tmp_path: Path, clock: SettableClock, hook: Webhook,
                       smtp_port: int) -> tuple[KeyService, Jobs, list[float]]:
    service = open_service(tmp_path, clock, channels(hook, smtp_port))
    service.init()
    sleeps: list[float] = []
    alerter = service.alerter()
    alerter._sleep = sleeps.append  # back-off observed, not waited for
    return service, Jobs(service, alerter), sleeps


def verify_signature(service: KeyService, body: bytes, signature: str | None) -> dict[str, Any]:
    assert signature is not None and ".." in signature  # detached: no payload inside
    service.invalidate()
    keys = KeySet.import_key_set(json.loads(service.jwks()[0]))
    header_b64, _, sig_b64 = signature.partition("..")
    payload_b64 = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
    obj = jws.deserialize_compact(f"{header_b64}.{payload_b64}.{sig_b64}", keys,
                                  algorithms=["PS256"])
    assert obj.payload == body
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def test_expiry_alerts_arrive_by_webhook_and_smtp_once_per_threshold(
        tmp_path: Path, smtp: tuple[Inbox, int], webhook: Webhook) -> None:
    inbox, port = smtp
    clock = SettableClock(T0)
    service, jobs, sleeps = open_with_channels(tmp_path, clock, webhook, port)
    try:
        not_after = min(k.not_after for k in service.keys() if k.not_after is not None)
        clock.set(not_after - timedelta(days=29))
        assert jobs.check_expiries().done  # both keys (signing, encryption) cross 30d
        assert sleeps == [1.0]  # the first post got 503: one retry after the back-off
        n_mail, n_hook = len(inbox.messages), len(webhook.bodies)
        assert n_mail == n_hook == 2
        alert = verify_signature(service, *webhook.bodies[0])
        assert alert["detail"]["threshold"] == "30d"
        # The audit head rides along: a copy of the anchor outside the store.
        length, digest = alert["audit_head"].split(":")
        assert int(length) >= 1 and service.audit.reaches(int(length), digest) is None
        assert "expires in 29.0 days" in inbox.messages[0]["Subject"]
        jobs.check_expiries()  # again: nothing new
        clock.advance(timedelta(hours=-1))  # a clock jump back: nothing new
        jobs.check_expiries()
        assert len(inbox.messages) == n_mail and len(webhook.bodies) == n_hook
        # A restart (new Jobs and Alerter, same store) remembers what was sent.
        restarted = Jobs(service, service.alerter())
        restarted.check_expiries()
        assert len(inbox.messages) == n_mail
        # Jumping past 14d and 7d at once gives one alert per key, at 7d.
        clock.set(not_after - timedelta(days=6))
        restarted.check_expiries()
        thresholds = [json.loads(b)["detail"]["threshold"] for b, _ in webhook.bodies[n_hook:]]
        assert thresholds == ["7d", "7d"]
        # Under the last threshold: once a day.
        clock.set(not_after - timedelta(hours=12))
        restarted.check_expiries()
        restarted.check_expiries()
        clock.advance(timedelta(hours=6))
        restarted.check_expiries()
        before = len(webhook.bodies)
        clock.advance(timedelta(days=1))
        restarted.check_expiries()
        assert len(webhook.bodies) == before + 2
        assert [json.loads(b)["detail"]["threshold"] for b, _ in webhook.bodies].count("1d") == 4
    finally:
        service.close()


def test_alerts_test_command_reaches_every_channel(
        tmp_path: Path, smtp: tuple[Inbox, int], webhook: Webhook) -> None:
    inbox, port = smtp
    cfg = write_config(tmp_path, {"lifecycle.transport": {"enabled": False},
                                  **channels(webhook, port)})
    keyd(cfg, "init")
    result = keyd(cfg, "alerts", "test")
    assert "webhook" in result.stdout and "smtp" in result.stdout
    assert len(inbox.messages) == 1 and inbox.messages[0]["Subject"].endswith("keyd test alert")
    assert json.loads(webhook.bodies[0][0])["subject"] == "test"


def test_a_dead_webhook_is_reported_and_does_not_stop_smtp(
        tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    dead = Webhook()
    dead.close()  # nothing listens there any more
    clock = SettableClock(T0)
    service, jobs, sleeps = open_with_channels(tmp_path, clock, dead, port)
    try:
        failed = jobs.alerter.send(Alert(subject="t", title="t", text="t"))
        assert failed == ["webhook"]
        assert sleeps == [1.0, 2.0, 4.0]  # exponential back-off between the 4 attempts
        assert len(inbox.messages) == 1
        assert service.active_key(Purpose.SIGNING)
    finally:
        service.close()
