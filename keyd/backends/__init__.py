"""Key backends: one protocol (base.py), one plugin per kind, one registry (here).

The registry maps a `[backend] kind` to the module that exports its
:class:`~keyd.backends.base.BackendPlugin` as ``PLUGIN``.  A plugin module is
imported only when its kind is asked for, so a local deployment never loads
hvac or python-pkcs11.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from keyd.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from keyd.backends.base import Backend, BackendPlugin
    from keyd.config.settings import Settings

log = logging.getLogger("keyd.backends")

_MODULES = {
    "local": "keyd.backends.local",
    "vault": "keyd.backends.vault",
    "pkcs11": "keyd.backends.pkcs11",
}
KINDS: tuple[str, ...] = tuple(_MODULES)


def plugin(kind: str) -> BackendPlugin:
    """The plugin of ``kind`` (imported on first use)."""
    if kind not in _MODULES:
        raise ConfigError(f"[backend] kind: {kind!r} is not one of {', '.join(KINDS)}")
    found: BackendPlugin = importlib.import_module(_MODULES[kind]).PLUGIN
    return found


def prepare(settings: Settings) -> list[str]:
    """Make what `keyd init` needs before the first key; lines for the operator."""
    return plugin(settings.backend.kind).prepare(settings)


def identity(settings: Settings) -> str | None:
    """What names this deployment's keys; None while it cannot be known yet."""
    return plugin(settings.backend.kind).identity(settings)


def open_backend(settings: Settings, *, require_up: bool = True) -> Backend:
    """The backend config.toml selects, checked so it says now why it cannot run.

    A configuration problem always stops start-up.  An outage (Vault sealed or
    unreachable) stops commands that need the backend, but not `keyd serve`
    (``require_up=False``): the daemon serves the JWKS, answers 503 on
    sign/decrypt and /readyz, and recovers without a restart.
    """
    backend = plugin(settings.backend.kind).build(settings)
    try:
        backend.check()
    except BackendUnavailable as e:
        if require_up:
            raise
        log.warning("backend not reachable at start-up, serving anyway: %s", e.detail)
    return backend
