"""The state every part of KeyService shares, and the lifecycle lock.

``ServiceCore`` holds the settings, the store, the backend, the audit log and
the clock; the per-concern classes in this package all build on it and are
the only code that touches those four.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cryptography import x509 as cx509
from sqlmodel import Session

from keyd import x509
from keyd.audit import AuditEvent, AuditLog
from keyd.backends.base import Backend
from keyd.clock import Clock
from keyd.config import Settings
from keyd.errors import ClockSkewed, NotFound
from keyd.lease import Lease
from keyd.model import Purpose
from keyd.policy import load_policies
from keyd.store import queries
from keyd.store.db import Store
from keyd.store.tables import KeyVersion

from .values import Caller, KeyInfo, UsableKey

if TYPE_CHECKING:
    from keyd.issuers import IssuerKeys


class ServiceCore:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: Backend,
        audit: AuditLog,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.audit = audit
        self.clock = clock
        self.policies = load_policies(settings.keyd.policies_dir, settings.keyd.client_id)
        self.issuers: dict[str, IssuerKeys] = {}
        if settings.issuers:  # httpx is imported only when there is one
            from keyd.issuers import IssuerKeys

            self.issuers = {
                name: IssuerKeys(issuer, clock) for name, issuer in settings.issuers.items()
            }
        self._lock = threading.Lock()
        self._usable: dict[str, UsableKey] = {}  # kid -> key, every published key
        self._active: dict[Purpose, UsableKey] = {}
        self._loaded_at = float("-inf")
        self._jwks: tuple[bytes, str] | None = None
        self._clients: dict[str, tuple[Caller, float]] = {}
        self._fencing = threading.local()
        self._jwks_last_good: tuple[bytes, str] | None = None
        self._store_down_until = float("-inf")
        self.lease: Lease | None = None  # set by `keyd serve` (start_lease)
        # The store's id, until the backend carries its mark (deployment.claim_backend);
        # None once it does, or when nobody asked.
        self._unclaimed_store: str | None = None

    def record(self, event: AuditEvent) -> None:
        """Append an event to the audit log (raises StoreUnavailable when it cannot)."""
        self.audit.record(event)

    def _audit_key(self, actor: str, action: str, info: KeyInfo,
                   detail: dict[str, object]) -> None:
        self.audit.record(AuditEvent(actor=actor, action=action, kid=info.kid,
                                     purpose=info.purpose.value,
                                     detail={"id": info.id, **detail}))

    def invalidate(self) -> None:
        """Drop the cached view of the published keys and the JWKS (see publication)."""
        with self._lock:
            self._loaded_at = float("-inf")
            self._jwks = None

    # ------------------------------------------------------------------ lifecycle lock

    @contextlib.contextmanager
    def fenced(self, fence: Callable[[Session], None]) -> Iterator[None]:
        """Lifecycle writes on this thread, until the block ends, first call
        ``fence(session)`` in their transaction (the leader's epoch check)."""
        self._fencing.check = fence
        try:
            yield
        finally:
            self._fencing.check = None

    def _lock_lifecycle(self, session: Session) -> None:
        """Every lifecycle write holds this lock for its transaction: refused on a
        replica whose clock is off, fenced on the leader's epoch."""
        lease = self.lease
        if lease is not None and lease.clock_error is not None:
            raise ClockSkewed(f"replica {lease.replica} makes no lifecycle writes: "
                              f"{lease.clock_error}")
        queries.lock_lifecycle(session)
        check: Callable[[Session], None] | None = getattr(self._fencing, "check", None)
        if check is not None:
            check(session)

    # ------------------------------------------------------------------ lookups

    def find(self, session: Session, kid_or_id: str) -> KeyVersion:
        key = queries.key_by_kid(session, kid_or_id) or queries.key_by_id(session, kid_or_id)
        if key is None:
            raise NotFound(f"no key with kid or id {kid_or_id!r}")
        return key

    def _current_leaf(self, session: Session, key_id: str) -> cx509.Certificate | None:
        cert = queries.current_certificate(session, key_id)
        return None if cert is None else x509.load_chain(cert.chain_pem.encode())[0]
