"""The scheduled work: idempotent reconcilers over stored state.

Each job asks "what is due now?" of the store (keyd/lifecycle.py answers from
timestamps) and carries out the answer through KeyService, one atomic
transition at a time.  So every job is safe to run twice, concurrently with
the CLI, after a crash, or after the clock jumped: work already done is no
longer due.  One key's (or one purpose's) failure is logged and alerted and
does not stop the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509 as cx509

from keyd import deploy, lifecycle
from keyd.alerts import Alert, Alerter
from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.errors import KeydError, RotationUnderWay
from keyd.jose.jwks import cert_thumbprint
from keyd.lifecycle import Step
from keyd.metrics import LIFECYCLE
from keyd.model import KeyState, Mode, Purpose
from keyd.replica import known_dead
from keyd.service import KeyService
from keyd.store.tables import KeyIntent

log = logging.getLogger("keyd.jobs")

ACTOR = "scheduler"
DAY = timedelta(days=1)
MAX_PASSES = 4  # create -> activate -> destroy can all fall due in one run (sandbox "0s")


@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.done.extend(other.done)
        self.errors.extend(other.errors)


class Jobs:
    def __init__(self, service: KeyService, alerter: Alerter | None = None) -> None:
        self.service = service
        self.alerter = alerter or service.alerter()
        self._lock = threading.Lock()  # one run at a time in this process

    # ------------------------------------------------------------------ entry

    def run(self, *, startup: bool = False) -> Report:
        """Everything, in order: recovery (on start-up), lifecycle, deployment, expiries."""
        with self._lock:
            report = Report()
            steps: list[Callable[[], Report]] = [self.reconcile, self.deploy_transport,
                                                 self.refresh_issuers, self.check_expiries,
                                                 self.checkpoint_audit]
            if startup:
                steps.insert(0, self.recover)
            for step in steps:
                try:
                    report.extend(step())
                except Exception as e:  # noqa: BLE001 - the next job still runs
                    log.exception("job %s failed", step.__name__)
                    report.errors.append(f"{step.__name__}: {e}")
            return report

    # ------------------------------------------------------------------ lifecycle

    def reconcile(self) -> Report:
        """Carry out what lifecycle.plan() says is due, for every enabled purpose."""
        report = Report()
        for purpose in self.service.settings.enabled_purposes():
            try:
                self._reconcile_purpose(purpose, report)
            except Exception as e:  # noqa: BLE001 - one purpose never stops the others
                log.exception("lifecycle of %s failed", purpose.value)
                report.errors.append(f"{purpose.value}: {e}")
                self._job_failed(purpose, "reconcile", e)
        return report

    def _reconcile_purpose(self, purpose: Purpose, report: Report) -> None:
        life = self.service.settings.lifecycle[purpose]
        for _ in range(MAX_PASSES):
            now = self.service.clock.now()
            actions = lifecycle.plan(self.service.key_times(purpose), life, now)
            progressed = False
            for action in actions:
                try:
                    progressed |= self._carry_out(purpose, action)
                    if action.step is not Step.AWAIT_CERTIFICATE:
                        report.done.append(f"{purpose.value}: {action.step.value} "
                                           f"{action.key_id or ''} ({action.reason})")
                except Exception as e:  # noqa: BLE001 - one key never stops the others
                    log.exception("%s %s of %s failed", action.step.value, action.key_id,
                                  purpose.value)
                    report.errors.append(f"{purpose.value}: {action.step.value}: {e}")
                    self._job_failed(purpose, action.step.value, e)
            if not progressed:
                return

    def _carry_out(self, purpose: Purpose, action: lifecycle.Action) -> bool:
        service = self.service
        if action.step is Step.CREATE:
            try:
                info = service.create_key(purpose, actor=ACTOR)
            except RotationUnderWay as e:
                log.info("rotation of %s: %s", purpose.value, e.detail)  # another did it
                return False
            log.info("rotation of %s started: %s (%s)", purpose.value, info.kid or info.id,
                     action.reason)
            if info.state is KeyState.AWAITING_CERTIFICATE:
                self._csr_awaits(purpose, info.id, critical=action.reason == "no active key")
            return True
        if action.step is Step.ACTIVATE:
            assert action.key_id is not None
            service.activate(action.key_id, actor=ACTOR, reason=action.reason)
            return True
        if action.step is Step.DESTROY:
            assert action.key_id is not None
            return service.destroy(action.key_id, actor=ACTOR)
        if action.step is Step.RETIRE:
            assert action.key_id is not None
            service.retire(action.key_id, actor=ACTOR, reason=action.reason)
            return True
        assert action.key_id is not None
        self._csr_awaits(purpose, action.key_id, critical=action.reason == "no active key")
        return False

    def _csr_awaits(self, purpose: Purpose, key_id: str, *, critical: bool) -> None:
        """Production: tell the admins once that a CSR waits for the CA (daily when
        the purpose has no active key at all)."""
        text = (f"A new {purpose.value} key {key_id} waits for its certificate. Get its CSR "
                f"with `keyd csr {key_id}`, have the CA sign it, then run "
                f"`keyd cert import {key_id} FILE`.")
        if critical:
            text = f"No active {purpose.value} key: nothing can use this purpose. " + text
        alert = Alert(subject=f"csr:{key_id}", title=f"{purpose.value} CSR awaits a certificate",
                      text=text, severity="critical" if critical else "warning",
                      detail={"purpose": purpose.value, "key": key_id})
        threshold = "no-active" if critical else "awaits"
        if self.alerter.once(alert, threshold, repeat=DAY if critical else None):
            LIFECYCLE.alerted(purpose.value, "csr")

    def _job_failed(self, purpose: Purpose, what: str, error: Exception) -> None:
        detail = error.detail if isinstance(error, KeydError) else f"{type(error).__name__}"
        alert = Alert(subject=f"job:{purpose.value}:{what}",
                      title=f"keyd could not {what} the {purpose.value} key",
                      text=f"The scheduled {what} of the {purpose.value} key failed: {detail}. "
                           "keyd retries on every run.",
                      severity="critical", detail={"purpose": purpose.value, "step": what})
        try:
            if self.alerter.once(alert, "failed", repeat=DAY):
                LIFECYCLE.alerted(purpose.value, "job")
        except KeydError as e:
            log.error("could not record the alert for %s: %s", what, e.detail)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> Report:
        """After a crash: erase backend keys the store does not (or no longer) need,
        and revoke stored keys the backend lost.

        Only refs the backend lists as keyd's (its prefix and ref shape) are
        considered.  A key being made right now is known by its intent (see
        KeyService.recovery_view): an intent is abandoned only when its process
        is known dead (same host) or it is older than ``[scheduler]
        intent_grace``, and while any live intent has no backend ref yet, no
        unknown ref is erased (it may be that intent's key).
        """
        report = Report()
        service = self.service
        held, known, intents = service.recovery_view()
        now = service.clock.now()
        grace = service.settings.scheduler.intent_grace
        live: list[KeyIntent] = []
        for intent in intents:
            if known_dead(intent.replica) or utc(intent.created_at) + grace <= now:
                try:
                    if service.abandon_intent(intent, actor=ACTOR):
                        report.done.append(f"erased abandoned intent {intent.id}")
                except KeydError as e:
                    report.errors.append(f"erase intent {intent.id}: {e.detail}")
            else:
                live.append(intent)
        in_flight = {i.backend_ref for i in live if i.backend_ref is not None}
        unnamed_in_flight = any(i.backend_ref is None for i in live)
        for ref in sorted(held):
            row = known.get(ref)
            if ref in in_flight or (row is None and unnamed_in_flight):
                continue  # a key another process is making right now
            if row is None or row[1] not in lifecycle.LIVE_STATES:
                try:
                    what = "orphan" if row is None else f"{row[1].value} key {row[0]}"
                    service.erase_backend_key(ref, actor=ACTOR, was=what)
                    report.done.append(f"erased {what} {ref}")
                except KeydError as e:
                    report.errors.append(f"erase {ref}: {e.detail}")
        lost = {ref for ref, (_, state) in known.items()
                if state in lifecycle.LIVE_STATES and ref not in held}
        if lost:
            # A key made after the first listing and stored before the store was
            # read looks lost; a second listing, after the read, shows it.
            lost -= service.held_refs()
        for ref, (key_id, state) in sorted(known.items()):
            if ref in lost:
                # The backend lost a key the store relies on: it can neither sign
                # nor decrypt any more, so it must not stay published.
                try:
                    service.revoke(key_id, reason="lost from the backend", actor=ACTOR)
                    report.done.append(f"revoked lost key {key_id}")
                except KeydError as e:
                    report.errors.append(f"revoke lost {key_id}: {e.detail}")
                self.alerter.send(Alert(
                    subject=f"lost:{key_id}", title=f"key {key_id} lost from the backend",
                    text=f"The backend no longer holds key {key_id} ({state.value}); keyd "
                         "revoked it and activated a replacement where it could.",
                    severity="critical", detail={"key": key_id, "state": state.value}))
        return report

    # ------------------------------------------------------------------ deployment

    def deploy_transport(self) -> Report:
        """Make the configured files hold the active transport key (see keyd/deploy.py)."""
        report = Report()
        service = self.service
        target = service.settings.deploy
        if target.cert_path is None or Purpose.TRANSPORT not in service.settings.enabled_purposes():
            return report
        key = service.transport_key()
        if key is None:
            return report
        try:
            material = service.transport_material(key)
            if not deploy.needed(target, material):
                return report
            deploy.deploy(target, material)
            service.record(AuditEvent(actor=ACTOR, action="transport.deploy", kid=key.kid,
                                      purpose=Purpose.TRANSPORT.value,
                                      detail={"path": str(target.cert_path)}))
            report.done.append(f"deployed transport key {key.kid}")
        except KeydError as e:
            report.errors.append(f"deploy: {e.detail}")
            alert = Alert(subject=f"deploy:{key.kid}", title="transport key deployment failed",
                          text=f"Deploying transport key {key.kid} failed: {e.detail}",
                          severity="critical", detail={"kid": key.kid})
            if self.alerter.once(alert, "failed", repeat=DAY):
                LIFECYCLE.alerted(Purpose.TRANSPORT.value, "deploy")
        return report

    # ------------------------------------------------------------------ issuers

    def refresh_issuers(self) -> Report:
        """Keep each counterparty's JWKS warm, and say so when it cannot be fetched.

        Refreshing here (at half of max_age, like a verify would) means a
        verify rarely waits on a fetch.  A failed fetch keeps the last good
        set; once that set is older than max_age verification fails closed,
        and the alert turns critical.
        """
        report = Report()
        now = self.service.clock.now()
        for name, issuer in self.service.issuers.items():
            if issuer.fetched_at is not None and now - issuer.fetched_at < (
                    issuer.settings.max_age / 2):
                continue
            try:
                issuer.refresh()
                report.done.append(f"refreshed issuer {name}")
            except KeydError as e:
                report.errors.append(f"issuer {name}: {e.detail}")
                stale = issuer.fetched_at is None or now - issuer.fetched_at >= (
                    issuer.settings.max_age)
                alert = Alert(
                    subject=f"issuer:{name}", title=f"issuer {name} JWKS unreachable",
                    text=(f"Fetching {issuer.settings.jwks_uri} failed: {issuer.last_error}. "
                          + ("Its signatures cannot be verified until it is back."
                             if stale else "The last good set is still in use.")),
                    severity="critical" if stale else "warning",
                    detail={"issuer": name, "jwks_uri": issuer.settings.jwks_uri},
                )
                self.alerter.once(alert, "stale" if stale else "failing", repeat=DAY)
        return report

    # ------------------------------------------------------------------ audit

    def checkpoint_audit(self) -> Report:
        """Log the audit chain's head, so a copy lives outside the store (the
        journal, a log shipper): `keyd audit verify --expect` checks against it."""
        self.service.checkpoint_audit()
        return Report()  # nothing changed: a checkpoint is a log line

    # ------------------------------------------------------------------ expiries

    def check_expiries(self) -> Report:
        """Alert at each configured threshold before a certificate expires: once
        per threshold, and once a day under the last one (or once expired)."""
        report = Report()
        service = self.service
        now = service.clock.now()
        subjects: list[tuple[str, str, datetime, str]] = []  # (subject, what, not_after, purpose)
        for cert in service.certificate_expiries():
            subjects.append((f"certificate:{cert.thumbprint_s256}",
                             f"{cert.purpose} key {cert.kid}", cert.not_after, cert.purpose))
        for name, issuer in service.issuers.items():
            for leaf in issuer.certificates():
                subjects.append(_issuer_subject(name, leaf))
        for subject, what, not_after, purpose in subjects:
            try:
                if self._expiry_alert(subject, what, not_after, purpose, now):
                    report.done.append(f"expiry alert {subject}")
            except KeydError as e:
                report.errors.append(f"expiry alert {subject}: {e.detail}")
        return report

    def _expiry_alert(self, subject: str, what: str, not_after: datetime, purpose: str,
                      now: datetime) -> bool:
        thresholds = self.service.settings.alerts.thresholds  # longest first
        left = not_after - now
        crossed = [t for t in thresholds if left <= t]
        if not crossed:
            return False
        threshold = crossed[-1]  # the most urgent crossed: one alert even after a jump
        last = threshold == thresholds[-1]
        days = left.total_seconds() / 86400
        title = (f"certificate of {what} expired" if days < 0 else
                 f"certificate of {what} expires in {days:.1f} days")
        production = self.service.settings.keyd.mode is Mode.PRODUCTION
        alert = Alert(
            subject=subject, title=title,
            text=f"{title} (not after {not_after.isoformat()}). "
                 + ("Rotate or renew it now." if production else "Rotate it."),
            severity="critical" if last else "warning",
            detail={"not_after": not_after.isoformat(), "days_left": round(days, 2),
                    "threshold": _duration(threshold)},
        )
        sent = self.alerter.once(alert, _duration(threshold), repeat=DAY if last else None)
        if sent:
            LIFECYCLE.alerted(purpose, "expiry")
        return sent


def _issuer_subject(name: str, leaf: cx509.Certificate) -> tuple[str, str, datetime, str]:
    return (f"certificate:{cert_thumbprint(leaf)}", f"issuer {name}",
            utc(leaf.not_valid_after_utc), f"issuer:{name}")


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
