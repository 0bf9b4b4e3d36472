"""KeyService is the only way to the backend, the store and the audit log: the
modules that call it (jobs, tokens, the CLI, the scheduler, the API and the
console) never reach through it to those three."""

from __future__ import annotations

import re
from pathlib import Path

KEYD = Path(__file__).resolve().parents[2] / "keyd"
CALLERS = [KEYD / "jobs.py", KEYD / "tokens.py", KEYD / "cli.py", KEYD / "scheduler.py",
           *sorted((KEYD / "api").glob("*.py")), *sorted((KEYD / "console").glob("*.py"))]
# `service.store`, `self.keys.backend`, `console.service.audit`: the service's
# own attributes, reached from outside it.
REACH_THROUGH = re.compile(r"\b(?:service|keys)\.(?:backend|store|audit)\b")


def test_callers_of_the_service_never_touch_its_backend_store_or_audit_log() -> None:
    found = [f"{path.relative_to(KEYD.parent)}:{n}: {line.strip()}"
             for path in CALLERS
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if REACH_THROUGH.search(line)]
    assert found == []


def test_the_check_would_see_a_reach_through() -> None:
    """The pattern matches the forms the callers used before (so the test above can fail)."""
    assert REACH_THROUGH.search("service.audit.head()")
    assert REACH_THROUGH.search("backend = self.keys.backend")
    assert not REACH_THROUGH.search("settings.backend.kind")
