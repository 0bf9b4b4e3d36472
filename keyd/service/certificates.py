"""Certificates: a key's CSR, a CA's chain imported, a chain attached to its key."""

from __future__ import annotations

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from keyd import jose, lifecycle, x509
from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.errors import BadRequest, CertificateError, Conflict
from keyd.jose.jwks import cert_thumbprint
from keyd.model import MIN_RSA_BITS, KeyState, KidScheme, Mode, Purpose
from keyd.store import queries
from keyd.store.tables import Certificate, KeyVersion

from .steps import Steps
from .values import KeyInfo, key_info, load_public


class Certificates(Steps):
    def _subject(self) -> x509.Subject:
        return x509.Subject.of(self.settings.keyd)

    def _attach_certificate(
        self,
        session: Session,
        key: KeyVersion,
        chain: list[cx509.Certificate],
        source: str,
        assigned_kid: str | None,
    ) -> None:
        """Make ``chain`` the key's current certificate and name the key by it; a
        key awaiting its certificate is published (lifecycle.state_with_certificate)."""
        purpose = Purpose(key.purpose)
        leaf = chain[0]
        scheme = self.settings.keyd.kid
        if scheme is KidScheme.ASSIGNED and assigned_kid is None:
            # No directory has assigned one yet (a sandbox self-signed key):
            # the certificate thumbprint serves until an import pins one.
            scheme = KidScheme.X5T_S256
        if assigned_kid is not None:
            scheme = KidScheme.ASSIGNED
        kid = jose.kid_for(scheme, leaf, load_public(key.public_key_pem), assigned_kid)
        if key.kid is not None and key.kid != kid and KeyState(key.state).published:
            # A published kid is what verifiers cached; it never changes under them.
            raise Conflict(f"key {key.kid} is published; its kid cannot change to {kid}")
        clash = queries.key_by_kid(session, kid)
        if clash is not None and clash.id != key.id:
            raise Conflict(f"kid {kid} already names key {clash.id}")
        now = self.clock.now()
        queries.add_certificate(session, Certificate(
            key_id=key.id,
            chain_pem=x509.chain_pem(chain),
            thumbprint_s256=cert_thumbprint(leaf),
            not_before=utc(leaf.not_valid_before_utc),
            not_after=utc(leaf.not_valid_after_utc),
            source=source,
            created_at=now,
            current=True,
        ))
        key.kid = kid
        if KeyState(key.state) is KeyState.AWAITING_CERTIFICATE:
            has_active = bool(queries.keys_by_state(session, purpose.value, [KeyState.ACTIVE]))
            new_state = lifecycle.state_with_certificate(has_active)
            self._move(key, new_state, now)
            key.publish_at = now
            if new_state is KeyState.ACTIVE:
                key.activated_at = now
        session.add(key)

    def csr(self, kid_or_id: str, *, actor: str) -> str:
        """The key's CSR (made now, signed by the backend, if it has none yet)."""
        with self.store.session() as session:
            key = self.find(session, kid_or_id)
            state = KeyState(key.state)
            if state in (KeyState.DESTROYED, KeyState.REVOKED):
                raise Conflict(f"key {kid_or_id} is {state.value}; it gets no CSR")
            if key.csr_pem is None:
                csr = x509.make_csr(
                    self.backend, key.backend_ref, load_public(key.public_key_pem),
                    self._subject(), Purpose(key.purpose),
                )
                key.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
                session.add(key)
            self.audit.record(
                AuditEvent(actor=actor, action="key.csr", kid=key.kid, purpose=key.purpose,
                           detail={"id": key.id})
            )
            return key.csr_pem

    def import_certificate(
        self, kid_or_id: str, data: bytes, *, actor: str, assigned_kid: str | None = None
    ) -> tuple[KeyInfo, list[str]]:
        """Attach a CA-issued chain to its key after checking it matches and is sound."""
        if assigned_kid is not None:
            _check_assigned_kid(assigned_kid)
        elif self.settings.keyd.kid is KidScheme.ASSIGNED:
            raise BadRequest("kid scheme is 'assigned': give the directory's kid with --kid")
        chain = x509.load_chain(data)
        with self.store.session("certificate import", write=True) as session:
            self._lock_lifecycle(session)
            key = self.find(session, kid_or_id)
            state = KeyState(key.state)
            if state in (KeyState.DESTROYED, KeyState.REVOKED, KeyState.RETIRED):
                raise Conflict(f"key {kid_or_id} is {state.value}; it takes no certificate")
            warnings = x509.check_chain(
                chain,
                load_public(key.public_key_pem),
                self.clock.now(),
                production=self.settings.keyd.mode is Mode.PRODUCTION
                and not self.settings.keyd.throwaway,
            )
            if int(key.key_size) < MIN_RSA_BITS:
                raise CertificateError(f"key {kid_or_id} is under {MIN_RSA_BITS} bits")
            self._attach_certificate(session, key, chain, "imported", assigned_kid)
            self.audit.record(
                AuditEvent(
                    actor=actor, action="certificate.import", kid=key.kid, purpose=key.purpose,
                    detail={"id": key.id, "thumbprint": cert_thumbprint(chain[0]),
                            "state": key.state, "warnings": warnings},
                )
            )
            info = key_info(key, chain[0])
        self.invalidate()
        return info, warnings


def _check_assigned_kid(kid: str) -> None:
    if not 1 <= len(kid) <= 128 or not all(c.isalnum() or c in "-_.:#" for c in kid):
        raise BadRequest(f"assigned kid {kid[:40]!r} must be 1-128 of [A-Za-z0-9-_.:#]")
