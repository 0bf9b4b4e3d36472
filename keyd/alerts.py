"""Alerts to the admins: always the log, then each configured channel.

Channels: a webhook (JSON POST, retried with exponential back-off, signed by
keyd as a detached PS256 JWS in ``X-Keyd-Signature`` so a receiver can check
it against our JWKS) and e-mail over SMTP.  A channel that fails is logged
and reported; it never stops the others.

"Once" is remembered in the ``alerts_sent`` table, keyed by (subject,
threshold), so it survives restarts and a clock that jumps: a row already
there is never sent again, and a daily repeat waits until a day after the
stored time (a clock that went back simply waits longer).
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx

from keyd.audit import AuditEvent, AuditLog
from keyd.clock import Clock, utc
from keyd.config import Secret, Settings, SmtpSettings, WebhookSettings, read_secret
from keyd.errors import KeydError
from keyd.store import queries
from keyd.store.db import Store

log = logging.getLogger("keyd.alerts")

SIGNATURE_HEADER = "X-Keyd-Signature"

# Signs the webhook body: returns a detached compact JWS (header..signature),
# or None when no signing key is active (the alert still goes out, unsigned).
BodySigner = Callable[[bytes], str | None]


@dataclass(frozen=True)
class Alert:
    subject: str  # what it is about, e.g. "certificate:<thumbprint>"; part of the once-key
    title: str  # one line
    text: str  # a few lines for a human
    severity: str = "warning"  # info | warning | critical
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, at: datetime) -> dict[str, Any]:
        return {
            "subject": self.subject, "title": self.title, "text": self.text,
            "severity": self.severity, "detail": self.detail,
            "at": utc(at).isoformat().replace("+00:00", "Z"),
        }


class Alerter:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        signer: BodySigner | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        on_sent: Callable[[Alert], None] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.signer = signer
        self._sleep = sleep  # injectable: tests check the back-off without waiting
        self._on_sent = on_sent
        self._audit = audit

    # ------------------------------------------------------------------ sending

    def send(self, alert: Alert) -> list[str]:
        """Log the alert and deliver it to every channel; the channels that failed."""
        level = logging.ERROR if alert.severity == "critical" else logging.WARNING
        log.log(level, "ALERT [%s] %s: %s", alert.severity, alert.title, alert.text)
        failed: list[str] = []
        message = alert.to_json(self.clock.now())
        if self._audit is not None:
            # The audit head travels with every alert: one more copy outside
            # the store to check `keyd audit verify --expect` against.
            try:
                message["audit_head"] = "{}:{}".format(*self._audit.head())
            except KeydError as e:
                log.error("audit head not read for the alert: %s", e.detail)
        body = json.dumps(message, sort_keys=True).encode()
        if (hook := self.settings.alerts.webhook) is not None:
            try:
                self._post(hook, body)
            except KeydError as e:
                log.error("alert webhook %s failed: %s", hook.url, e.detail)
                failed.append("webhook")
        if (smtp := self.settings.alerts.smtp) is not None:
            try:
                self._mail(smtp, alert)
            except KeydError as e:
                log.error("alert e-mail via %s:%s failed: %s", smtp.host, smtp.port, e.detail)
                failed.append("smtp")
        if self._on_sent is not None:
            self._on_sent(alert)
        if self._audit is not None:
            try:
                self._audit.record(AuditEvent(
                    actor="keyd", action="alert.send", kid=alert.detail.get("kid"),
                    outcome="error" if failed else "ok",
                    detail={"title": alert.title, "severity": alert.severity,
                            "subject": alert.subject, "failed_channels": failed},
                ))
            except KeydError as e:
                # The alert went out; an audit outage must not stop the next one.
                log.error("alert %r not audited: %s", alert.title, e.detail)
        return failed

    def once(self, alert: Alert, threshold: str, *, repeat: timedelta | None = None) -> bool:
        """Send unless (subject, threshold) went out before (or, with ``repeat``,
        within that long).  True when sent.

        Claimed first, sent after: the claim is one conditional write in the
        store, so of several processes (replicas, or a leader and its
        successor) exactly one sends.  When every configured channel fails
        the claim is handed back, so the next run tries again; only a crash
        between claim and send loses the alert (the log line may survive).
        """
        now = self.clock.now()
        with self.store.session("alert claim", write=True) as session:
            claimed, previous = queries.claim_alert(session, alert.subject, threshold, now,
                                                    repeat)
        if not claimed:
            return False
        failed = self.send(alert)
        channels = sum(c is not None for c in (self.settings.alerts.webhook,
                                               self.settings.alerts.smtp))
        if channels and len(failed) == channels:
            with self.store.session("alert release", write=True) as session:
                queries.release_alert(session, alert.subject, threshold, now, previous)
        return True

    # ------------------------------------------------------------------ channels

    def _post(self, hook: WebhookSettings, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "keyd-alerts"}
        signature = self.signer(body) if self.signer is not None else None
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        delay = hook.backoff.total_seconds()
        last_error = ""
        for attempt in range(hook.retries + 1):
            if attempt:
                self._sleep(delay)
                delay *= 2
            try:
                response = httpx.post(hook.url, content=body, headers=headers,
                                      timeout=hook.timeout, follow_redirects=False)
            except httpx.HTTPError as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if 200 <= response.status_code < 300:
                return
            last_error = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                break  # the receiver refuses this alert; retrying will not change that
        raise KeydError(f"{hook.url}: {last_error} after {attempt + 1} attempt(s)")

    def _mail(self, smtp: SmtpSettings, alert: Alert) -> None:
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = ", ".join(smtp.to)
        message["Subject"] = f"[keyd {alert.severity}] {alert.title}"
        message.set_content(alert.text + "\n\n" + json.dumps(alert.detail, indent=2) + "\n")
        password = _smtp_password(smtp)
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
                if smtp.starttls:
                    client.starttls(context=ssl.create_default_context())
                if smtp.username and password is not None:
                    client.login(smtp.username, password.reveal().decode())
                client.send_message(message)
        except (OSError, smtplib.SMTPException) as e:
            raise KeydError(f"{type(e).__name__}: {e}") from e


def _smtp_password(smtp: SmtpSettings) -> Secret | None:
    return read_secret(smtp.password_file, "KEYD_SMTP_PASSWORD", "smtp-password")
