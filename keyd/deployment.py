"""Deployment guards: a store serves one backend, and says so.

The first process to use a store records its id and the backend's identity
(kind, and the Vault mount and key prefix, the HSM token label, or the local
master key's fingerprint).  A replica configured with another backend would
see every stored key as "lost" and revoke it; it refuses to start instead,
with one line naming both.  The other way round, a shared backend (Vault
or OpenBao) carries the id of the store that owns its keys, and a second
store pointed at the same mount and ``key_prefix`` refuses to start too.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from keyd import backends
from keyd.backends.base import Backend, ClaimsStore
from keyd.clock import Clock
from keyd.config import Settings
from keyd.errors import BackendUnavailable, ConfigError
from keyd.store import queries
from keyd.store.db import Store


def backend_identity(settings: Settings) -> str | None:
    """What names this deployment's keys; None when it cannot be known yet
    (a local backend whose master key does not exist before `keyd init`)."""
    return backends.identity(settings)


def check(store: Store, settings: Settings) -> str:
    """Record (first use) or compare the backend identity; returns the store id."""
    identity = backend_identity(settings)
    with store.session("deployment identity", write=True) as session:
        store_id = queries.deployment_fact(session, "store_id", str(uuid.uuid4()))
        if identity is None:
            return store_id
        recorded = queries.deployment_fact(session, "backend", identity)
    if recorded != identity:
        raise ConfigError(f"store {store_id} holds the keys of {recorded}, but this "
                          f"replica's backend is {identity}: refusing to start")
    return store_id


def claim_backend(backend: Backend, store_id: str, *, required: bool) -> bool:
    """Mark a shared backend (Vault/OpenBao) as this store's, or refuse (ConfigError
    naming both stores) when another store owns it: a second store on one
    ``key_prefix`` would erase the first one's keys as orphans.  False when the
    backend is down and not ``required`` (checked again before recovery)."""
    if not isinstance(backend, ClaimsStore):
        return True
    try:
        backend.claim_store(store_id)
    except BackendUnavailable:
        if required:
            raise
        return False
    return True


# Lifecycle timestamps come from each replica's clock (injected, see clock.py);
# a replica whose clock is this far from the database's refuses to start, and
# one that drifts this far while running stops leading and refuses lifecycle
# writes until its clock is back (the lease checks on every tick), so no two
# replicas disagree by more about what is due.
MAX_CLOCK_SKEW = timedelta(seconds=5)


def clock_skew(store: Store, clock: Clock) -> float:
    """Seconds between ``clock`` and the database's clock (absolute)."""
    with store.session("clock check") as session:
        before = clock.now()
        db_now = store.now(session.connection())
        after = clock.now()
    local = before + (after - before) / 2
    return abs((local - db_now).total_seconds())


def skew_error(skew: float) -> str | None:
    """Why a clock ``skew`` seconds off the database's is refused; None when fine."""
    if skew <= MAX_CLOCK_SKEW.total_seconds():
        return None
    return (f"this host's clock is {skew:.1f}s off the database's (at most "
            f"{MAX_CLOCK_SKEW.total_seconds():.0f}s allowed): fix its time sync (NTP)")


def check_clock(store: Store, clock: Clock) -> None:
    """Refuse a replica whose clock is more than MAX_CLOCK_SKEW off the database's."""
    error = skew_error(clock_skew(store, clock))
    if error is not None:
        raise ConfigError(error)
