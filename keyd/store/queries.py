"""Typed queries over the tables.  Lookups and plain writes only, no rules."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from keyd.model import KeyState
from keyd.store import locks
from keyd.store.tables import (
    AlertSent,
    Certificate,
    Client,
    DeploymentFact,
    KeyIntent,
    KeyVersion,
    ReplicaSeen,
    SeenJti,
)

# Longest kid or jti looked up or stored as given.  A hostile token can carry
# a 10 KB kid; no stored kid is that long, and a long jti is kept as its hash.
MAX_ID_LEN = 255

# Expired seen_jti rows are purged on every Nth record_jti call that knows the time.
JTI_PURGE_EVERY = 500
_jti_calls = itertools.count(1)

# ------------------------------------------------------------------ key versions


def _storable(value: str) -> bool:
    """Could the database hold this id?  (PostgreSQL text refuses NUL.)"""
    return len(value) <= MAX_ID_LEN and "\x00" not in value


def key_by_id(session: Session, key_id: str) -> KeyVersion | None:
    if not _storable(key_id):
        return None
    return session.get(KeyVersion, key_id)


def key_by_kid(session: Session, kid: str) -> KeyVersion | None:
    # A hostile token's kid is only ever a lookup key; one that no stored
    # kid can equal is answered here instead of becoming a database error.
    if not _storable(kid):
        return None
    return session.exec(select(KeyVersion).where(KeyVersion.kid == kid)).first()


def keys_by_state(
    session: Session, purpose: str, states: Iterable[str | KeyState]
) -> list[KeyVersion]:
    """Key versions of one purpose in any of `states`, oldest first."""
    wanted = [s.value if isinstance(s, KeyState) else s for s in states]
    query = (
        select(KeyVersion)
        .where(KeyVersion.purpose == purpose, col(KeyVersion.state).in_(wanted))
        .order_by(col(KeyVersion.created_at), col(KeyVersion.id))
    )
    return list(session.exec(query).all())


def published_keys(session: Session) -> list[KeyVersion]:
    """Every key version whose state puts it in the JWKS, oldest first."""
    states = [s.value for s in KeyState if s.published]
    query = (
        select(KeyVersion)
        .where(col(KeyVersion.state).in_(states))
        .order_by(col(KeyVersion.created_at), col(KeyVersion.id))
    )
    return list(session.exec(query).all())


def all_keys(session: Session) -> list[KeyVersion]:
    query = select(KeyVersion).order_by(
        col(KeyVersion.purpose), col(KeyVersion.created_at), col(KeyVersion.id)
    )
    return list(session.exec(query).all())


# ------------------------------------------------------------------ certificates


def certificates_of(session: Session, key_id: str) -> list[Certificate]:
    """Every certificate a key version has had, oldest first."""
    query = (
        select(Certificate).where(Certificate.key_id == key_id).order_by(col(Certificate.id))
    )
    return list(session.exec(query).all())


def current_certificate(session: Session, key_id: str) -> Certificate | None:
    query = (
        select(Certificate)
        .where(Certificate.key_id == key_id, col(Certificate.current).is_(True))
        .order_by(col(Certificate.id).desc())
    )
    return session.exec(query).first()


def add_certificate(session: Session, cert: Certificate) -> Certificate:
    """Store `cert`; if it is current, the key's other certificates stop being so."""
    if cert.current:
        for old in certificates_of(session, cert.key_id):
            if old.current:
                old.current = False
                session.add(old)
    session.add(cert)
    session.flush()
    return cert


# ------------------------------------------------------------------ clients


def client_by_token_hash(session: Session, token_hash: str) -> Client | None:
    """The client (revoked or not: the caller decides) holding this token hash."""
    return session.exec(select(Client).where(Client.token_hash == token_hash)).first()


def client_by_name(session: Session, name: str) -> Client | None:
    return session.exec(select(Client).where(Client.name == name)).first()


def add_client(
    session: Session, name: str, policy: str, token_hash: str, created_at: datetime
) -> Client:
    """A new client row; a taken name or hash surfaces as Conflict at commit."""
    client = Client(name=name, policy=policy, token_hash=token_hash, created_at=created_at)
    session.add(client)
    session.flush()
    return client


def all_clients(session: Session) -> list[Client]:
    return list(session.exec(select(Client).order_by(col(Client.name))).all())


# ------------------------------------------------------------------ replay memory


def record_jti(
    session: Session,
    issuer: str,
    jti: str,
    expires_at: datetime,
    *,
    now: datetime | None = None,
) -> bool:
    """Remember (issuer, jti); False when it was already seen (a replay).

    The primary key decides, in the database, via INSERT ... ON CONFLICT DO
    NOTHING: two requests racing with the same jti (threads or processes)
    cannot both get True.  Expired rows are purged every JTI_PURGE_EVERY
    calls that pass `now` (time is injected, never read here).
    """
    if not _storable(jti):
        jti = "sha256:" + hashlib.sha256(jti.encode()).hexdigest()
    if now is not None and next(_jti_calls) % JTI_PURGE_EVERY == 0:
        purge_jti(session, now)
    inserted = _insert_if_absent(
        session, SeenJti, {"issuer": issuer, "jti": jti, "expires_at": expires_at}
    )
    return inserted


def purge_jti(session: Session, now: datetime) -> int:
    """Forget jtis whose tokens expired before `now`; returns how many."""
    result = session.exec(delete(SeenJti).where(col(SeenJti.expires_at) < now))
    return int(getattr(result, "rowcount", 0) or 0)


# ------------------------------------------------------------------ alerts


def mark_alert_sent(session: Session, subject: str, threshold: str, sent_at: datetime) -> bool:
    """True the first time (subject, threshold) is marked; False ever after."""
    return _insert_if_absent(
        session, AlertSent, {"subject": subject, "threshold": threshold, "sent_at": sent_at}
    )


def _insert_if_absent(session: Session, table: Any, values: dict[str, Any]) -> bool:
    """INSERT unless the primary key exists; True when a row was inserted."""
    conn = session.connection()
    insert: Any = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    # RETURNING yields a row only when the insert happened: a portable
    # "was it new?" that does not depend on driver rowcount semantics.
    pk = [c for c in table.__table__.primary_key.columns]
    stmt = insert(table).values(**values).on_conflict_do_nothing().returning(*pk)
    return conn.execute(stmt).first() is not None


# ------------------------------------------------------------------ lifecycle

def lock_lifecycle(session: Session) -> None:
    """Serialise lifecycle transitions across processes until the transaction ends.

    PostgreSQL: an advisory lock.  SQLite: the caller opened the session with
    ``write=True`` (BEGIN IMMEDIATE), which already holds the database's one
    write lock, so nothing more is needed.
    """
    locks.lock_transaction(session.connection(), locks.LIFECYCLE_LOCK)


def keys_of_purpose(session: Session, purpose: str) -> list[KeyVersion]:
    """Every key version of one purpose, oldest first."""
    query = (
        select(KeyVersion)
        .where(KeyVersion.purpose == purpose)
        .order_by(col(KeyVersion.created_at), col(KeyVersion.id))
    )
    return list(session.exec(query).all())


def alert_sent_at(session: Session, subject: str, threshold: str) -> datetime | None:
    row = session.get(AlertSent, (subject, threshold))
    return None if row is None else row.sent_at


def set_alert_sent(session: Session, subject: str, threshold: str, sent_at: datetime) -> None:
    """Record (or move forward) when an alert was last sent: daily repeats."""
    row = session.get(AlertSent, (subject, threshold))
    if row is None:
        session.add(AlertSent(subject=subject, threshold=threshold, sent_at=sent_at))
    else:
        row.sent_at = sent_at
        session.add(row)


def count_published(session: Session, purpose: str) -> int:
    """How many key versions of `purpose` are in the JWKS (pending, active, retired)."""
    states = [s.value for s in KeyState if s.published]
    query = select(func.count()).select_from(KeyVersion).where(
        KeyVersion.purpose == purpose, col(KeyVersion.state).in_(states))
    return int(session.exec(query).one())


# ------------------------------------------------------------------ key intents


def intent_for(session: Session, purpose: str) -> KeyIntent | None:
    return session.exec(select(KeyIntent).where(KeyIntent.purpose == purpose)).first()


def claim_intent(session: Session, intent: KeyIntent) -> bool:
    """Insert `intent` unless its purpose already has one; True when claimed."""
    return _insert_if_absent_on(session, KeyIntent, intent.model_dump(), "purpose")


def set_intent_ref(session: Session, intent_id: str, ref: str) -> bool:
    """Record the backend's name for an intent's key; False when the intent is gone."""
    result = session.exec(update(KeyIntent).where(col(KeyIntent.id) == intent_id)
                          .values(backend_ref=ref))
    return int(getattr(result, "rowcount", 0) or 0) == 1


def drop_intent(session: Session, intent_id: str) -> bool:
    """Delete an intent; False when it was already gone (recovery erased it)."""
    result = session.exec(delete(KeyIntent).where(col(KeyIntent.id) == intent_id))
    return int(getattr(result, "rowcount", 0) or 0) == 1


def all_intents(session: Session) -> list[KeyIntent]:
    return list(session.exec(select(KeyIntent).order_by(col(KeyIntent.created_at))).all())


def _insert_if_absent_on(session: Session, table: Any, values: dict[str, Any],
                         *index: str) -> bool:
    """INSERT ... ON CONFLICT (index) DO NOTHING; True when a row was inserted."""
    conn = session.connection()
    insert: Any = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    pk = [c for c in table.__table__.primary_key.columns]
    stmt = (insert(table).values(**values).on_conflict_do_nothing(index_elements=list(index))
            .returning(*pk))
    return conn.execute(stmt).first() is not None


def claim_alert(session: Session, subject: str, threshold: str, now: datetime,
                repeat: timedelta | None) -> tuple[bool, datetime | None]:
    """Claim the sending of (subject, threshold) at ``now``: (claimed, previous sent_at).

    The first time is an INSERT ... ON CONFLICT DO NOTHING; a repeat is a
    compare-and-set on the stored time, so two processes never both win.
    """
    if _insert_if_absent(session, AlertSent,
                         {"subject": subject, "threshold": threshold, "sent_at": now}):
        return True, None
    previous = alert_sent_at(session, subject, threshold)
    if repeat is None or previous is None or previous + repeat > now:
        return False, previous
    result = session.exec(
        update(AlertSent)
        .where(col(AlertSent.subject) == subject, col(AlertSent.threshold) == threshold,
               col(AlertSent.sent_at) == previous)
        .values(sent_at=now))
    return int(getattr(result, "rowcount", 0) or 0) == 1, previous


def release_alert(session: Session, subject: str, threshold: str, claimed_at: datetime,
                  previous: datetime | None) -> None:
    """Undo our claim (every channel failed), unless another process claimed since."""
    mine = (col(AlertSent.subject) == subject, col(AlertSent.threshold) == threshold,
            col(AlertSent.sent_at) == claimed_at)
    if previous is None:
        session.exec(delete(AlertSent).where(*mine))
    else:
        session.exec(update(AlertSent).where(*mine).values(sent_at=previous))


def replicas_seen(session: Session) -> list[ReplicaSeen]:
    return list(session.exec(select(ReplicaSeen).order_by(col(ReplicaSeen.seen_at).desc())).all())


def deployment_fact(session: Session, name: str, value: str) -> str:
    """The stored value of fact ``name``, recording ``value`` if there is none yet."""
    _insert_if_absent(session, DeploymentFact, {"name": name, "value": value})
    row = session.get(DeploymentFact, name)
    assert row is not None
    return row.value
