"""The one protocol every key backend implements.

A backend holds private keys and performs the private-key operations; it knows
nothing of purposes' lifecycles, kids, JWKS or policy.  A key is named by an
opaque ``ref`` the backend chooses at generation time; the store keeps it.

Contract (tests/fixtures/backend_contract.py checks every implementation against it):
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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.model import OaepHash, Purpose, SignScheme

if TYPE_CHECKING:
    from keyd.config.settings import Settings
    from keyd.config.table import Table


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do.

    Each plugin declares them statically (config asks before any backend is
    built); a built backend may narrow ``oaep_hashes`` after probing its token.
    """

    oaep_hashes: frozenset[OaepHash]  # OAEP digests decrypt() accepts
    exports_private_keys: bool  # can hand a transport key to a TLS terminator
    name: str = ""  # e.g. "local", "vault", "pkcs11" (for logs and /readyz)
    # One process per token: `[api] workers = "auto"` runs a single worker.
    one_process: bool = False


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


def nothing_to_prepare(settings: Settings) -> list[str]:
    """A backend that needs nothing on disk before `keyd init` (Vault, an HSM)."""
    return []


@dataclass(frozen=True)
class BackendPlugin:
    """Everything keyd knows about one backend kind, without building a backend.

    Each ``keyd/backends/<kind>`` exports one as ``PLUGIN``; the registry in
    :mod:`keyd.backends` finds it by kind, so nothing outside a backend compares
    kind names.
    """

    capabilities: Capabilities  # declared statically; see Capabilities
    # Its `[backend.<kind>]` table -> its settings; relative paths against the
    # config folder (first Path) or the data directory (second).
    read_settings: Callable[[Table, Path, Path], object]
    build: Callable[[Settings], Backend]  # may raise ConfigError naming the fix
    # What names this deployment's keys (stored once per store, compared by
    # every replica); None while it cannot be known yet.
    identity: Callable[[Settings], str | None]
    # Make what `keyd init` needs before the first key (the local master key);
    # returns lines to tell the operator.  Idempotent.
    prepare: Callable[[Settings], list[str]] = nothing_to_prepare

    @property
    def kind(self) -> str:
        """The `[backend] kind` value, and the `[backend.<kind>]` table: the
        name its capabilities declare."""
        return self.capabilities.name
