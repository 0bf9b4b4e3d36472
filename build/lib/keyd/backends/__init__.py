"""Key backends: one protocol (base.py), one module per implementation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from keyd.errors import BackendUnavailable

if TYPE_CHECKING:
    from keyd.backends.base import Backend
    from keyd.config import Settings

log = logging.getLogger("keyd.backends")


def open_backend(settings: Settings, *, require_up: bool = True) -> Backend:
    """The backend config.toml selects, checked so it says now why it cannot run.

    A configuration problem always stops start-up.  An outage (Vault sealed or
    unreachable) stops commands that need the backend, but not `keyd serve`
    (``require_up=False``): the daemon serves the JWKS, answers 503 on
    sign/decrypt and /readyz, and recovers without a restart.
    """
    kind = settings.backend.kind
    backend: Backend
    if kind == "local":
        from keyd.backends import local

        backend = local.from_settings(settings)
    elif kind == "vault":
        from keyd.backends import vault

        backend = vault.from_settings(settings)
    else:
        from keyd.backends import pkcs11

        backend = pkcs11.from_settings(settings)
    try:
        backend.check()
    except BackendUnavailable as e:
        if require_up:
            raise
        log.warning("backend not reachable at start-up, serving anyway: %s", e.detail)
    return backend
