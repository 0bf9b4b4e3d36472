"""Named crash points for the crash-safety tests.

``KEYD_FAILPOINT=after_generate:kill`` makes the process SIGKILL itself when
it reaches ``hit("after_generate")``: no cleanup, no finally blocks, no
buffered writes flushed, just as a power cut or the OOM killer would.  Unset,
``hit`` costs one dictionary lookup.  Only ``kill`` is an action: a failpoint
that raised would exercise the error paths, not the recovery ones.
"""

from __future__ import annotations

import os
import signal

# Every failpoint, in the order a rotation reaches them.  tests/daemon/test_crash.py
# sweeps this list, so a new failpoint is tested by being added here.
POINTS = (
    "after_generate",  # the backend holds a key the store does not know yet
    "after_certificate",  # certificate or CSR made, key row not yet committed
    "after_create",  # new key committed (pending or awaiting its certificate)
    "before_activate",  # a pending key is about to become active
    "after_activate",  # activation committed; caches and deployment not yet updated
    "before_revoke",  # replacement ready, revocation not yet committed
    "after_revoke",  # revocation committed; the backend key not yet erased
    "before_destroy",  # a retired key's overlap is over, nothing changed yet
    "before_backend_destroy",  # store says destroyed (out of the JWKS), backend key still there
    "after_backend_destroy",  # erased from the backend, store still says retired
)

ENV = "KEYD_FAILPOINT"


def _armed() -> str | None:
    value = os.environ.get(ENV, "")
    name, _, action = value.partition(":")
    if not name:
        return None
    if name not in POINTS or action != "kill":
        raise ValueError(f"{ENV}={value!r}: use NAME:kill with NAME one of {', '.join(POINTS)}")
    return name


def hit(name: str) -> None:
    """SIGKILL this process here if ``KEYD_FAILPOINT`` names this point."""
    assert name in POINTS, name  # a typo would silently never fire
    if _armed() == name:
        os.kill(os.getpid(), signal.SIGKILL)
