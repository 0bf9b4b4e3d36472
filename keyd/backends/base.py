"""The one protocol every key backend implements.

A backend holds private keys and performs the private-key operations; it knows
nothing of purposes' lifecycles, kids, JWKS or policy.  A key is named by an
opaque ``ref`` the backend chooses at generation time; the store keeps it.

Contract (tests/backend_contract.py checks every implementation against it):
- ``generate`` returns a new key that is immediately usable;
- ``sign(ref, data, PSS_SHA256)`` is RSASSA-PSS, SHA-256, MGF1-SHA256, 32-byte
  salt over ``data`` (the message, not a digest);
- ``sign(ref, data, PKCS1V15_SHA256)`` is RSASSA-PKCS1-v1_5 with SHA-256;
- ``decrypt(ref, ct, hash)`` is RSAES-OAEP with that digest for hash and MGF1,
  and raises :class:`keyd.errors.DecryptionFailed` for any bad ciphertext;
- ``destroy`` makes the private key unusable for good; destroying an unknown
  ref is not an error (it makes crash recovery idempotent);
- every failure is a :class:`keyd.errors.KeydError`: ``BackendUnavailable``
  for outages (the API answers 503 + Retry-After), ``KeyNotFound`` for an
  unknown ref, ``Unsupported`` (422) for an operation or OAEP hash that
  ``capabilities`` leave out, decided before any key or ciphertext is read,
  ``BackendError`` otherwise.  No library exception escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.model import OaepHash, Purpose, SignScheme


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, decided once at start-up (after probing)."""

    oaep_hashes: frozenset[OaepHash]  # OAEP digests decrypt() accepts
    exports_private_keys: bool  # can hand a transport key to a TLS terminator
    name: str = ""  # e.g. "local", "vault", "pkcs11" (for logs and /readyz)


@dataclass(frozen=True)
class GeneratedKey:
    ref: str  # the backend's own name for the key; opaque to everyone else
    public_key: rsa.RSAPublicKey


@runtime_checkable
class Backend(Protocol):
    capabilities: Capabilities

    def check(self) -> None:
        """Say why the backend cannot run (raise KeydError), before first use.

        Called at start-up: "pkcs11: library /usr/lib/... not found" beats a
        failure on the first sign.  Also the /readyz probe.
        """
        ...

    def generate(self, purpose: Purpose, size: int, *, exportable: bool = False) -> GeneratedKey:
        """Create a new RSA key of ``size`` bits.  ``exportable`` only for transport."""
        ...

    def public_key(self, ref: str) -> rsa.RSAPublicKey: ...

    def sign(self, ref: str, data: bytes, scheme: SignScheme) -> bytes: ...

    def decrypt(self, ref: str, ciphertext: bytes, oaep_hash: OaepHash) -> bytes: ...

    def export_private_key_pem(self, ref: str) -> bytes:
        """PKCS#8 PEM of an exportable key; BackendError where not exportable."""
        ...

    def destroy(self, ref: str) -> None: ...

    def list_refs(self) -> list[str]:
        """Every key this backend holds for keyd (orphan checks after a crash)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RenewsCredentials(Protocol):
    """A backend whose login expires (Vault tokens): the scheduler renews it."""

    def renew(self) -> None:
        """Renew the credential, logging in again where renewal fails."""
        ...


@runtime_checkable
class ClaimsStore(Protocol):
    """A backend shared over the network (Vault/OpenBao): it records which keyd
    store owns its keys, so a second store pointed at them refuses to start
    instead of erasing them as orphans."""

    def claim_store(self, store_id: str) -> None:
        """Mark the keys as ``store_id``'s (first use) or raise ConfigError naming
        both stores when another store owns them."""
        ...
