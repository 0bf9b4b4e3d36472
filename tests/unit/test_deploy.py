"""Transport deployment: when a transport key becomes active its chain and
(exportable) key land at the configured paths, 0600 and whole, the reload
command runs, and a failing reload is an alert, not a crash."""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from keyd.audit import EventFilter
from keyd.clock import SettableClock
from keyd.jobs import Jobs
from keyd.model import KeyState, Purpose
from tests.fixtures.service import DAY, T0, Recorder, by_state, jobs_for, open_service


def deploy_tables(folder: Path, reload: list[str]) -> dict[str, dict[str, object]]:
    return {
        "lifecycle.transport": {"enabled": True, "rotate_after": "90d", "prepublish": "2d",
                                "overlap": "7d"},
        "deploy.transport": {"cert_path": str(folder / "tls" / "chain.pem"),
                             "key_path": str(folder / "tls" / "key.pem"),
                             "reload_command": reload},
    }


def test_active_transport_key_is_deployed_0600_and_reloaded_once(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    reload = [sys.executable, "-c",
              f"import pathlib; p = pathlib.Path({str(marker)!r}); "
              "p.write_text(p.read_text() + 'x' if p.exists() else 'x')"]
    clock = SettableClock(T0)
    service = open_service(tmp_path, clock, deploy_tables(tmp_path, reload))
    try:
        service.init()
        jobs = jobs_for(service, Recorder())
        jobs.run()
        chain, key = tmp_path / "tls" / "chain.pem", tmp_path / "tls" / "key.pem"
        assert chain.stat().st_mode & 0o777 == 0o600 and key.stat().st_mode & 0o777 == 0o600
        active = by_state(service, KeyState.ACTIVE, Purpose.TRANSPORT)[0]
        leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        private, public = load_pem_private_key(key.read_bytes(), None), leaf.public_key()
        assert isinstance(private, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert leaf.not_valid_after_utc == active.not_after
        assert marker.read_text() == "x"
        jobs.run()  # nothing changed: no rewrite, no reload
        assert marker.read_text() == "x"
        # A rotation: the new transport key is deployed when it becomes active.
        clock.advance(90 * DAY)
        jobs.run()
        clock.advance(2 * DAY)
        jobs.run()
        new_active = by_state(service, KeyState.ACTIVE, Purpose.TRANSPORT)[0]
        assert new_active.kid != active.kid
        new_leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        assert new_leaf.not_valid_after_utc == new_active.not_after
        assert marker.read_text() == "xx"
        assert not [p for p in (tmp_path / "tls").iterdir() if p.name.startswith(".")]
    finally:
        service.close()


def test_a_failing_reload_command_is_an_alert(tmp_path: Path) -> None:
    reload = [sys.executable, "-c", "import sys; sys.exit('nginx: config test failed')"]
    service = open_service(tmp_path, SettableClock(T0), deploy_tables(tmp_path, reload))
    try:
        service.init()
        recorder = Recorder()
        report = jobs_for(service, recorder).run()
        assert any("reload command" in error and "exited 1" in error for error in report.errors)
        assert [a.title for a in recorder.sent] == ["transport key deployment failed"]
        assert "config test failed" in recorder.sent[0].text
        # The signing and encryption lifecycle went on regardless.
        assert by_state(service, KeyState.ACTIVE, Purpose.SIGNING)
    finally:
        service.close()


def test_alerts_are_audited(tmp_path: Path) -> None:
    reload = [sys.executable, "-c", "import sys; sys.exit(3)"]
    service = open_service(tmp_path, SettableClock(T0), deploy_tables(tmp_path, reload))
    try:
        service.init()
        Jobs(service).run()  # the default alerter: log, configured channels, audit
        events = service.audit.list(EventFilter(action="alert.send"))
        assert [e.detail["title"] for e in events] == ["transport key deployment failed"]
        assert events[0].actor == "keyd" and events[0].kid is not None
    finally:
        service.close()
