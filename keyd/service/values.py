"""What KeyService hands out: callers, usable keys, key and client views.

Plain frozen values, built from store rows here so no row leaves the service.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd import lifecycle
from keyd.clock import utc
from keyd.model import KeyState, Purpose
from keyd.policy import Policy
from keyd.store.tables import KeyVersion


@dataclass(frozen=True)
class Caller:
    """An authenticated local-API client (or the CLI acting as admin)."""

    name: str
    policy: Policy


@dataclass(frozen=True)
class UsableKey:
    """What the hot path needs to use a key: no database round-trip."""

    key_id: str
    kid: str
    purpose: Purpose
    state: KeyState
    ref: str


@dataclass(frozen=True)
class KeyInfo:
    """A key version as the CLI and the admin API show it."""

    id: str
    kid: str | None
    purpose: Purpose
    state: KeyState
    alg: str | None
    key_size: int
    backend: str
    created_at: datetime
    not_before: datetime | None = None  # the current certificate's (None: no certificate)
    not_after: datetime | None = None
    activated_at: datetime | None = None
    # A pending key's first moment of signing: published + prepublish (the
    # scheduler activates it at its first run from then on).
    activates_at: datetime | None = None

    @property
    def provisional(self) -> bool:
        """No certificate has fixed the kid yet: the key goes by its id."""
        return self.kid is None

    @property
    def kid_or_id(self) -> str:
        """What the key goes by: its kid, or its id while the kid is provisional."""
        return self.id if self.kid is None else self.kid

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kid": self.kid_or_id,
            "provisional": self.provisional,
            "purpose": self.purpose.value,
            "state": self.state.value,
            "alg": self.alg,
            "key_size": self.key_size,
            "backend": self.backend,
            "created_at": rfc3339(self.created_at),
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
            **({"activates_at": rfc3339(self.activates_at)}
               if self.state is KeyState.PENDING else {}),
        }


@dataclass(frozen=True)
class ClientInfo:
    """A local-API client as admins see it."""

    name: str
    policy: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class CertificateExpiry:
    """A published, not retired key's current certificate: what expiry alerts watch."""

    thumbprint_s256: str
    kid: str | None
    purpose: str
    not_after: datetime


@dataclass(frozen=True)
class TransportKey:
    """The active transport key, as deploying it to files needs it."""

    kid: str
    chain_pem: bytes
    ref: str
    exportable: bool


def rfc3339(when: datetime | None) -> str | None:
    return None if when is None else utc(when).isoformat().replace("+00:00", "Z")


def maybe_utc(when: datetime | None) -> datetime | None:
    return None if when is None else utc(when)


def hash_token(token: str) -> str:
    """Client tokens carry 256 random bits, so one SHA-256 is the right hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def key_times(key: KeyVersion, not_after: datetime | None = None) -> lifecycle.KeyTimes:
    """The lifecycle planner's view of one stored key version."""
    return lifecycle.KeyTimes(
        id=key.id, state=KeyState(key.state), created_at=utc(key.created_at),
        publish_at=maybe_utc(key.publish_at), activated_at=maybe_utc(key.activated_at),
        retired_at=maybe_utc(key.retired_at), destroy_after=maybe_utc(key.destroy_after),
        not_after=maybe_utc(not_after))


def key_info(key: KeyVersion, leaf: cx509.Certificate | None) -> KeyInfo:
    purpose = Purpose(key.purpose)
    return KeyInfo(
        id=key.id,
        kid=key.kid,
        purpose=purpose,
        state=KeyState(key.state),
        alg=purpose.jwk_alg,
        key_size=key.key_size,
        backend=key.backend,
        created_at=utc(key.created_at),
        not_before=None if leaf is None else utc(leaf.not_valid_before_utc),
        not_after=None if leaf is None else utc(leaf.not_valid_after_utc),
        activated_at=maybe_utc(key.activated_at),
    )


def public_pem(public_key: rsa.RSAPublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)  # the store only ever holds RSA keys
    return key
