"""Private-key operations and the reads the scheduled jobs need.

The one definition of "sign with the active key" (``active_signer``: API
tokens and alert bodies alike), the CEK unwrap for a JWE, the replay memory
for verified tokens, the transport key's deployable material and the
certificates whose expiry is watched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from keyd import deploy, jose
from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.errors import InvalidToken, KeydError
from keyd.model import KeyState, OaepHash, Purpose, SignScheme
from keyd.store import queries

from .publication import Publication
from .values import CertificateExpiry, TransportKey, UsableKey

if TYPE_CHECKING:
    from keyd.alerts import Alerter


class Operations(Publication):
    def active_signer(self) -> tuple[UsableKey, jose.Signer]:
        """The active signing key and a function signing with it in the backend
        (RSASSA-PSS SHA-256: PS256).  Conflict when there is no active key."""
        key = self.active_key(Purpose.SIGNING)
        backend = self.backend

        def sign(data: bytes) -> bytes:
            return backend.sign(key.ref, data, SignScheme.PSS_SHA256)

        return key, sign

    def cek_unwrapper(self, key: UsableKey,
                      alg: object) -> Callable[[bytes, OaepHash], bytes]:
        """A function decrypting a JWE's encrypted key with ``key`` in the backend.

        A backend that cannot do the header's OAEP hash (Vault transit: SHA-256
        only) is refused here, before any RSA work (the alg is public, so this
        reveals nothing).
        """
        backend = self.backend
        offered = OaepHash.by_jwe_alg().get(str(alg))
        if offered is not None and offered not in backend.capabilities.oaep_hashes:
            raise InvalidToken(
                f"{offered.jwe_alg} is not supported by the {backend.capabilities.name} "
                "backend; encrypt with RSA-OAEP-256"
            )

        def unwrap_cek(encrypted_key: bytes, oaep_hash: OaepHash) -> bytes:
            return backend.decrypt(key.ref, encrypted_key, oaep_hash)

        return unwrap_cek

    def remember_jti(self, issuer: str, jti: str, expires: datetime, *, now: datetime) -> bool:
        """Record a verified token's (issuer, jti); False when it was seen before (a replay)."""
        # write=True: read-then-insert under SQLite's write lock; `now` lets
        # record_jti purge expired entries as it goes.
        with self.store.session("replay check", write=True) as session:
            return queries.record_jti(session, issuer, jti, expires, now=now)

    def alerter(self) -> Alerter:
        """An Alerter whose webhook bodies are signed by keyd's active signing key."""
        from keyd.alerts import Alerter  # httpx: imported only where alerts are sent

        def sign(body: bytes) -> str | None:
            try:
                key, signer = self.active_signer()
            except KeydError:
                return None
            token = jose.sign_jws(signer, key.kid, body, detached=True)
            self.audit.record(AuditEvent(actor="alerts", action="sign.alert", kid=key.kid,
                                         purpose=Purpose.SIGNING.value))
            return token

        return Alerter(self.settings, self.store, self.clock, sign, audit=self.audit)

    def transport_key(self) -> TransportKey | None:
        """The active transport key with its current chain, or None (nothing to deploy)."""
        with self.store.session("deploy read") as session:
            active = queries.keys_by_state(session, Purpose.TRANSPORT.value, [KeyState.ACTIVE])
            if not active or active[0].kid is None:
                return None
            key = active[0]
            cert = queries.current_certificate(session, key.id)
        if cert is None or key.kid is None:
            return None
        return TransportKey(key.kid, cert.chain_pem.encode(), key.backend_ref, key.exportable)

    def transport_material(self, key: TransportKey) -> deploy.Material:
        """What deploying ``key`` writes: its chain, and its private key where the
        key and its backend allow export."""
        exportable = key.exportable and self.backend.capabilities.exports_private_keys
        key_pem = self.backend.export_private_key_pem(key.ref) if exportable else None
        return deploy.Material(key.kid, key.chain_pem, key_pem)

    def certificate_expiries(self) -> list[CertificateExpiry]:
        """The current certificate of every published key that is not retired."""
        out: list[CertificateExpiry] = []
        with self.store.session("expiry read") as session:
            for key in queries.published_keys(session):
                if KeyState(key.state) is KeyState.RETIRED:
                    continue  # on its way out: nothing for an admin to do
                cert = queries.current_certificate(session, key.id)
                if cert is not None:
                    out.append(CertificateExpiry(cert.thumbprint_s256, key.kid, key.purpose,
                                                 utc(cert.not_after)))
        return out
