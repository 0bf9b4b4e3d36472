"""What the console's pages show, read through KeyService, the store and the audit log.

Reads only: every change goes through KeyService, the same door the CLI and
the admin API use.  Each function returns plain values for a template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from keyd import lifecycle, x509
from keyd.audit import AuditRecord, EventFilter
from keyd.clock import utc
from keyd.errors import KeydError
from keyd.issuers import IssuerKeys
from keyd.model import KeyState, KidScheme, Purpose
from keyd.service import ClientInfo, KeyInfo, KeyService
from keyd.service.values import key_info, key_times, maybe_utc

RECENT_ALERTS = 10
# "Last used" comes from the audit log: the newest event each client made,
# looked for among this many newest events (a bounded read on a busy log).
LAST_USED_WINDOW = 100_000


@dataclass(frozen=True, kw_only=True)
class KeyRow(KeyInfo):
    """A key version as the service shows it, with what the console's pages add."""

    state_changed_at: datetime
    # its certificate and whether one can be uploaded (see _takes_certificate)
    subject: str | None = None
    issuer: str | None = None
    cert_source: str | None = None
    has_csr: bool = False
    takes_certificate: bool = False
    # its lifecycle: the moments past and the next one due
    publish_at: datetime | None = None
    rotates_at: datetime | None = None  # an active key: when the scheduler replaces it
    retired_at: datetime | None = None
    destroy_after: datetime | None = None
    revoked_reason: str | None = None


@dataclass
class PurposeView:
    purpose: Purpose
    enabled: bool
    active: KeyRow | None = None
    pending: list[KeyRow] = field(default_factory=list)
    awaiting: list[KeyRow] = field(default_factory=list)
    retired: list[KeyRow] = field(default_factory=list)


def key_rows(service: KeyService) -> list[KeyRow]:
    """Every key version, oldest first within each purpose."""
    rows: list[KeyRow] = []
    for key, cert in service.key_records():
        leaf = None if cert is None else x509.load_chain(cert.chain_pem.encode())[0]
        info = key_info(key, leaf)
        life = service.settings.lifecycle[info.purpose]
        if info.state is KeyState.PENDING:
            info = replace(info, activates_at=lifecycle.ready_at(key_times(key), life))
        active_since = info.activated_at if info.state is KeyState.ACTIVE else None
        rows.append(KeyRow(
            **vars(info),
            state_changed_at=utc(key.state_changed_at),
            subject=None if leaf is None else leaf.subject.rfc4514_string(),
            issuer=None if leaf is None else leaf.issuer.rfc4514_string(),
            cert_source=None if cert is None else cert.source,
            has_csr=key.csr_pem is not None,
            takes_certificate=_takes_certificate(info.state, service.settings.keyd.kid),
            publish_at=maybe_utc(key.publish_at),
            rotates_at=None if active_since is None else active_since + life.rotate_after,
            retired_at=maybe_utc(key.retired_at),
            destroy_after=maybe_utc(key.destroy_after),
            revoked_reason=key.revoked_reason,
        ))
    return rows


def _takes_certificate(state: KeyState, scheme: KidScheme) -> bool:
    """Can a certificate be imported for a key in ``state``?

    A key awaiting its certificate, always.  A published key only when its
    kid does not come from the certificate (an RFC 7638 thumbprint of the key):
    under x5t#S256 a new certificate would change a kid verifiers have cached,
    which keyd refuses.
    """
    if state is KeyState.AWAITING_CERTIFICATE:
        return True
    return state in (KeyState.PENDING, KeyState.ACTIVE) and scheme in (KidScheme.RFC7638,
                                                                        KidScheme.OB_UK)


def overview(service: KeyService, rows: list[KeyRow]) -> list[PurposeView]:
    enabled = set(service.settings.enabled_purposes())
    views = {p: PurposeView(p, p in enabled) for p in Purpose}
    for row in rows:
        view = views[row.purpose]
        if row.state is KeyState.ACTIVE:
            view.active = row
        elif row.state is KeyState.PENDING:
            view.pending.append(row)
        elif row.state is KeyState.AWAITING_CERTIFICATE:
            view.awaiting.append(row)
        elif row.state is KeyState.RETIRED:
            view.retired.append(row)
    # Signing first: it is the key counterparties see most.
    order = [Purpose.SIGNING, Purpose.ENCRYPTION, Purpose.TRANSPORT]
    return [views[p] for p in order if views[p].enabled or _any(views[p])]


def _any(view: PurposeView) -> bool:
    return bool(view.active or view.pending or view.awaiting or view.retired)


def readiness(service: KeyService) -> dict[str, Any]:
    """What /readyz answers, shaped for the overview."""
    try:
        return shape_readiness(service.ready())
    except KeydError as e:
        return {"ready": False, "checks": {"keyd": e.detail}, "leader": None, "replica": None}


def shape_readiness(answer: Mapping[str, object]) -> dict[str, Any]:
    """``ready``, ``checks``, and ``leader`` and ``replica`` where keyd reports them
    (None where it does not).  Checks may sit beside ``ready`` or under ``checks``."""
    rest = dict(answer)
    ready = rest.pop("ready", False) is True
    leader, replica = rest.pop("leader", None), rest.pop("replica", None)
    checks = rest.pop("checks", None)
    if not isinstance(checks, dict):
        checks = rest
    return {"ready": ready, "checks": checks,
            "leader": leader if isinstance(leader, bool) else None,
            "replica": None if replica is None else str(replica)}


def recent_alerts(service: KeyService) -> list[AuditRecord]:
    return service.audit_page(EventFilter(action="alert.send"), limit=RECENT_ALERTS)


def published_kids(service: KeyService) -> list[str]:
    body, _ = service.jwks()
    return [str(k.get("kid")) for k in json.loads(body)["keys"]]


# ---------------------------------------------------------------------- counterparties


@dataclass(frozen=True)
class IssuerKeyRow:
    kid: str
    kty: str
    alg: str | None
    use: str | None
    size: str
    not_after: datetime | None


@dataclass(frozen=True)
class IssuerView:
    name: str
    jwks_uri: str
    max_age: timedelta
    fetched_at: datetime | None
    attempted_at: datetime | None
    last_error: str | None
    dropped: list[str]
    keys: list[IssuerKeyRow]
    fresh: bool


def issuers(service: KeyService) -> list[IssuerView]:
    now = service.clock.now()
    views = []
    for name, issuer in sorted(service.issuers.items()):
        fetched = issuer.fetched_at
        views.append(IssuerView(
            name=name,
            jwks_uri=issuer.settings.jwks_uri,
            max_age=issuer.settings.max_age,
            fetched_at=fetched,
            attempted_at=issuer.attempted_at,
            last_error=issuer.last_error,
            dropped=list(issuer.dropped),
            keys=_issuer_keys(issuer),
            fresh=fetched is not None and now - fetched < issuer.settings.max_age,
        ))
    return views


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _issuer_keys(issuer: IssuerKeys) -> list[IssuerKeyRow]:
    # A certificate belongs to the JWK whose public key it carries.
    expiry: dict[bytes, datetime] = {}
    for cert in issuer.certificates():
        try:
            expiry[_spki(cert.public_key())] = utc(cert.not_valid_after_utc)
        except ValueError:
            continue
    rows = []
    for kid, key in sorted(issuer.cached_keys().items()):
        size = f"{key.public.key_size} bits" if key.curve is None else str(key.curve)
        rows.append(IssuerKeyRow(kid=kid, kty=str(key.family), alg=key.alg, use=key.use,
                                 size=size, not_after=expiry.get(_spki(key.public))))
    return rows


# ---------------------------------------------------------------------- clients


@dataclass(frozen=True)
class ClientRow:
    info: ClientInfo
    last_used: datetime | None


def clients(service: KeyService) -> list[ClientRow]:
    infos = service.clients()
    seen = service.clients_last_seen([c.name for c in infos], LAST_USED_WINDOW)
    return [ClientRow(c, maybe_utc(seen.get(c.name))) for c in infos]

