"""KeyService: the one place that joins backend, store, policy and audit.

The local API, the console, the CLI, the token operations (keyd/tokens.py)
and the scheduled jobs (keyd/jobs.py) all call it; none of them touches the
backend, the store or the audit log directly.  One module per concern:

    values.py        what it hands out: Caller, UsableKey, KeyInfo, ClientInfo
    core.py          the shared state, the lifecycle lock (fencing), key lookups
    wiring.py        open/close, the replica's lease, readiness, replicas seen
    steps.py         the state changes themselves, each checked by keyd/lifecycle.py
    certificates.py  CSRs, imported chains, a chain attached to its key
    keys.py          init, the purpose's slot (key intents), key creation, listings
    transitions.py   activate, retire, destroy, rotate (--now), revoke
    recovery.py      the backend's and the store's views for crash recovery
    publication.py   the hot path's cached keys and the JWKS
    operations.py    signing with the active key, CEK unwrap, replay memory,
                     alerts' signer, transport deployment and expiry reads
    clients.py       local-API clients and their authentication
    auditing.py      reading the audit log (head, verify, listings)
"""

from __future__ import annotations

from .auditing import Auditing
from .clients import Clients
from .operations import Operations
from .publication import KEY_CACHE_SECONDS, STORE_RETRY
from .recovery import Recovery
from .transitions import ROTATE_NOW_WAIT, Transitions
from .values import (
    Caller,
    CertificateExpiry,
    ClientInfo,
    KeyInfo,
    TransportKey,
    UsableKey,
    hash_token,
)
from .wiring import Wiring

__all__ = [
    "KEY_CACHE_SECONDS",
    "ROTATE_NOW_WAIT",
    "STORE_RETRY",
    "Caller",
    "CertificateExpiry",
    "ClientInfo",
    "KeyInfo",
    "KeyService",
    "TransportKey",
    "UsableKey",
    "hash_token",
]


class KeyService(Wiring, Transitions, Recovery, Operations, Clients, Auditing):
    """Every concern above, on one object built by ``KeyService.open(settings)``."""
