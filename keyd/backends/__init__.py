"""Key backends: one protocol (base.py), one module per implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyd.backends.base import Backend
    from keyd.config import Settings


def open_backend(settings: Settings) -> Backend:
    """The backend config.toml selects, checked so it says now why it cannot run."""
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
    backend.check()
    return backend
