"""The audit log: hash chains in the database, written before results go out.

The log is made of segments, one per replica (process, ``host:pid``; the
events written before segments existed are the segment "legacy").  Each
segment is its own chain: every row carries ``hash = sha256(prev_hash ||
canonical_json(fields))``, the segment's first row chaining from 64 zeros.
Editing, deleting or reordering any row breaks its segment's chain at that
row, which ``verify()`` reports as (segment, seq).  (Cutting rows off the
*end* of a segment, or dropping a whole segment, leaves valid chains; the
head, a digest over every segment's length and last hash, exported
elsewhere and recorded in ``audit_heads``, is what detects that.)

Appends to one segment are serialised so it never forks: within a process
by one writer thread, across processes by a lock on that segment only,
taken inside the appending transaction: ``BEGIN IMMEDIATE`` on SQLite (one
host), a per-segment ``pg_advisory_xact_lock`` on PostgreSQL, and the
primary key (segment, seq) behind both.  A replica stuck in an append (cut
off from PostgreSQL mid-transaction) holds only its own segment's lock: the
other replicas go on appending to theirs.

Fail closed: ``record()`` returns only once the event is committed (SQLite
synchronous=FULL, so on disk).  If it cannot be written, ``record()`` raises
``StoreUnavailable`` and the caller must not hand out the result it was
about to return.

Speed: the sign path records one event per signature.  Rather than one
transaction (and one fsync) per event, ``record()`` queues the event and
waits; the writer commits everything queued so far as one batch (group
commit), then wakes each waiter, or gives each ``StoreUnavailable``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import Connection, func, insert, literal, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from keyd.clock import Clock, utc
from keyd.errors import StoreUnavailable
from keyd.replica import this_replica
from keyd.store.db import AUDIT_LOCK, Store, store_error
from keyd.store.tables import AuditEventRow, AuditHeadRow

log = logging.getLogger(__name__)

GENESIS = "0" * 64
LEGACY = "legacy"  # the segment of the events written before segments (migration 0005)
OUTCOMES = frozenset({"ok", "refused", "error"})
MAX_BATCH = 2000  # events per group commit
MAX_DETAIL_STRING = 512  # longer strings are cut: a log is no place for a document
WAIT_TIMEOUT = 30.0  # seconds record() waits for its batch before failing closed

# Detail keys that name secret material.  The detail goes to admins and
# exports; a payload, token, PIN or private key member in it would be a
# leak, so such a key is a programming error (ValueError), found in tests.
_SECRET_WORDS = frozenset({
    "token", "tokens", "secret", "secrets", "pin", "password", "passwd", "passphrase",
    "payload", "plaintext", "credential", "credentials", "assertion", "bearer",
    "authorization", "cookie", "private", "privkey", "master", "jwt", "jws", "jwe",
})
# JWK private members (RFC 7518 6.3.2, 6.4): whole key names only.
_SECRET_NAMES = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


_HEAD = re.compile(r"^(0|[1-9][0-9]{0,18}):([0-9a-f]{64})$")


def parse_head(text: str) -> tuple[int, str]:
    """``LENGTH:HASH`` as ``keyd audit head`` prints it; ValueError otherwise."""
    m = _HEAD.match(text.strip())
    if not m:
        raise ValueError(f"{text[:80]!r} is not LENGTH:HASH (as `keyd audit head` prints it)")
    return int(m.group(1)), m.group(2)


def payload_hash(data: bytes) -> str:
    """Hex SHA-256 of a payload: proves which bytes an action touched, without them."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    action: str
    kid: str | None = None
    purpose: str | None = None
    outcome: str = "ok"
    detail: Mapping[str, Any] = field(default_factory=dict)
    payload_hash: str | None = None


@dataclass(frozen=True)
class Broken:
    """The first event where a segment's chain breaks."""

    segment: str
    seq: int

    def __str__(self) -> str:
        return f"{self.seq} of segment {self.segment}"


@dataclass(frozen=True)
class AuditRecord:
    """One stored event, as read back."""

    segment: str
    seq: int
    at: datetime
    actor: str
    action: str
    kid: str | None
    purpose: str | None
    outcome: str
    detail: dict[str, Any]
    payload_hash: str | None
    prev_hash: str
    hash: str


class _Pending:
    """An event on its way into the chain, and the waiter's wake-up call."""

    __slots__ = ("values", "done", "error")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        # A held lock the writer releases: a cheaper wake-up than an Event.
        self.done = threading.Lock()
        self.done.acquire()
        self.error: str | None = None


class AuditLog:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._writer: threading.Thread | None = None
        self._conn: Connection | None = None  # the writer thread's own

    # ------------------------------------------------------------------ writing

    def record(self, event: AuditEvent) -> None:
        """Append `event`; durable when this returns, else StoreUnavailable.

        Called inside an open ``store.session()`` on this thread, the event
        joins that transaction instead: it commits, or rolls back, together
        with the change it describes.  (Waiting for the writer there could
        deadlock on SQLite, where the caller's transaction holds the lock.)
        """
        pending = _Pending(self._prepare(event))
        session = self._store.active_session()
        if session is not None:
            try:
                _append(self._store, session.connection(), this_replica(), [pending.values])
            except SQLAlchemyError as e:
                raise store_error(e, f"audit append ({event.action})") from e
            return
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"audit log is closed; {event.action} not recorded")
            self._start_writer()
            self._queue.put(pending)
        if not pending.done.acquire(timeout=WAIT_TIMEOUT):
            raise StoreUnavailable(
                f"audit log not written within {WAIT_TIMEOUT:.0f}s ({event.action})"
            )
        if pending.error is not None:
            raise StoreUnavailable(pending.error)

    def close(self) -> None:
        """Write what is queued, then stop the writer.  Later record() calls fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            if writer is not None:
                self._queue.put(None)
        if writer is not None:
            writer.join()

    def _prepare(self, event: AuditEvent) -> dict[str, Any]:
        if event.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome {event.outcome!r} is not one of {sorted(OUTCOMES)}")
        detail = _clean(event.detail, "detail")
        return {
            "at": utc(self._clock.now()),
            "actor": event.actor,
            "action": event.action,
            "kid": event.kid,
            "purpose": event.purpose,
            "outcome": event.outcome,
            "detail": json.dumps(detail, sort_keys=True, separators=(",", ":"), allow_nan=False),
            "payload_hash": event.payload_hash,
        }

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._run, name="keyd-audit-writer", daemon=True
            )
            self._writer.start()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._disconnect()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            # Let threads woken by the last batch queue their next event first.
            time.sleep(0)
            batch = [first]
            # Everything that queued while the last batch was committing goes
            # into this one: one transaction, one fsync for all of them.
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: builtins.list[_Pending]) -> None:
        error: str | None = None
        try:
            # One connection kept for the writer's life: no pool checkout (and
            # no PostgreSQL pre-ping round trip) per batch.
            if self._conn is None:
                self._conn = self._store.connect(write=True)
            with self._conn.begin():
                _append(self._store, self._conn, this_replica(), [p.values for p in batch])
        except SQLAlchemyError as e:
            self._disconnect(broken=True)  # a fresh connection for the next batch
            error = str(store_error(e, "audit append"))
        except Exception as e:  # noqa: BLE001 - every waiter must wake, whatever broke
            self._disconnect(broken=True)
            log.exception("audit writer failed")
            error = f"audit log not written: {type(e).__name__}: {e}"
        for p in batch:
            p.error = error
            p.done.release()

    def _disconnect(self, *, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if broken:
                conn.invalidate()  # not back into the pool: it may be dead
            conn.close()
        except SQLAlchemyError:
            log.warning("audit writer: closing its database connection failed")

    # ------------------------------------------------------------------ reading

    def verify(self) -> Broken | None:
        """None when every segment's chain is whole, else its first broken event."""
        with self._store.session("audit verify") as session:
            segments = [str(s) for s in session.exec(
                select(col(AuditEventRow.segment)).distinct().order_by(col(AuditEventRow.segment))
            ).all()]
        for segment in segments:
            seq = self._verify_segment(segment)
            if seq is not None:
                return Broken(segment, seq)
        return None

    def _verify_segment(self, segment: str) -> int | None:
        prev, expected, after = GENESIS, 1, 0
        while True:
            with self._store.session("audit verify") as session:
                rows = session.exec(
                    select(AuditEventRow)
                    .where(AuditEventRow.segment == segment)
                    .where(col(AuditEventRow.seq) > after)
                    .order_by(col(AuditEventRow.seq))
                    .limit(5000)
                ).all()
            if not rows:
                return None
            for row in rows:
                # A gap (a deleted row) or an edited row shows up here: the
                # seq, the link to the row before, or the row's own hash.
                if row.seq != expected or row.prev_hash != prev or _hash_row(row) != row.hash:
                    return row.seq
                prev, expected = row.hash, row.seq + 1
            after = rows[-1].seq

    def segments(self) -> builtins.list[tuple[str, int, str]]:
        """Every segment's ``(name, length, hash of its newest event)``, sorted."""
        seg, seq = col(AuditEventRow.segment), col(AuditEventRow.seq)
        last = (select(seg.label("segment"), func.max(seq).label("seq"))
                .group_by(seg).subquery())
        with self._store.session("audit head") as session:
            rows = session.exec(
                select(seg, seq, col(AuditEventRow.hash))
                .join(last, (last.c.segment == seg) & (last.c.seq == seq))
                .order_by(seg)
            ).all()
        return [(str(r[0]), int(r[1]), str(r[2])) for r in rows]

    def head(self) -> tuple[int, str]:
        """``(events, digest over every segment's (name, length, head))``;
        ``(0, GENESIS)`` when empty.  Recorded in the store, so that
        ``reaches()`` can check every segment against it later."""
        segments = self.segments()
        if not segments:
            return 0, GENESIS
        length = sum(n for _, n, _ in segments)
        digest = _head_digest(segments)
        values = {"hash": digest, "length": length,
                  "segments": json.dumps(segments, separators=(",", ":")),
                  "recorded_at": utc(self._clock.now())}
        dialect_insert = pg_insert if self._store.dialect == "postgresql" else sqlite_insert
        statement = dialect_insert(AuditHeadRow).values(**values).on_conflict_do_nothing()
        session = self._store.active_session()
        try:
            if session is not None:
                session.connection().execute(statement)
            else:
                with self._store.session("audit head", write=True) as s:
                    s.connection().execute(statement)
        except SQLAlchemyError as e:
            raise store_error(e, "audit head") from e
        return length, digest

    def checkpoint(self) -> str:
        """Log the head as a checkpoint line (a copy outside the store) and return it."""
        length, digest = self.head()
        line = f"{length}:{digest}"
        log.info("audit checkpoint %s at %s", line, utc(self._clock.now()).isoformat())
        return line

    def reaches(self, length: int, digest: str) -> str | None:
        """None when every segment still reaches the length and hash it had
        at head ``length:digest`` (recorded earlier), else why not.  Run
        ``verify()`` as well: this checks the anchor, ``verify()`` the links."""
        if length == 0:
            return None if digest == GENESIS else "the head of an empty chain is 64 zeros"
        with self._store.session("audit anchor") as session:
            recorded = session.get(AuditHeadRow, digest)
            if recorded is None or recorded.length != length:
                return ("this store never had that head: it was rewritten "
                        "or is another store")
            stored: builtins.list[tuple[str, int, str, str | None]] = []
            for segment, n, hash_ in json.loads(recorded.segments):
                row = session.get(AuditEventRow, (segment, n))
                stored.append((segment, n, hash_, None if row is None else row.hash))
        current = {name: n for name, n, _ in self.segments()}
        for segment, n, hash_, now in stored:
            if now is None:
                return (f"segment {segment} has {current.get(segment, 0)} events but reached "
                        f"{n}:{hash_[:16]}... before: events were cut off its end")
            if now != hash_:
                return (f"event {n} of segment {segment} has hash {now[:16]}..., not the "
                        f"recorded {hash_[:16]}...: the chain was rewritten")
        return None

    def list(
        self,
        *,
        since: datetime | None = None,
        action: str | None = None,
        kid: str | None = None,
        actor: str | None = None,
        limit: int = 100,
    ) -> builtins.list[AuditRecord]:
        """Events in (time, segment, seq) order: the first `limit` from `since`,
        else the latest `limit`."""
        limit = max(1, min(limit, 10_000))
        query = _filtered(select(AuditEventRow), since=since, until=None, action=action,
                          kid=kid, actor=actor)
        order = _ORDER if since is not None else [c.desc() for c in _ORDER]
        query = query.order_by(*order).limit(limit)
        with self._store.session("audit read") as session:
            rows = builtins.list(session.exec(query).all())
        if since is None:
            rows.reverse()
        return [_record(r) for r in rows]

    def page(
        self,
        *,
        before: tuple[str, int] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        action: str | None = None,
        kid: str | None = None,
        actor: str | None = None,
        limit: int = 50,
    ) -> builtins.list[AuditRecord]:
        """Newest first, filtered (the console): up to `limit` events older, in
        (time, segment, seq) order, than the event `before` (segment, seq)."""
        limit = max(1, min(limit, 1000))
        query = select(AuditEventRow)
        if before is not None:
            at = (select(col(AuditEventRow.at))
                  .where(AuditEventRow.segment == before[0], AuditEventRow.seq == before[1])
                  .scalar_subquery())
            query = query.where(tuple_(*_ORDER) < tuple_(at, literal(before[0]),
                                                         literal(before[1])))
        query = _filtered(query, since=since, until=until, action=action, kid=kid,
                          actor=actor)
        query = query.order_by(*[c.desc() for c in _ORDER]).limit(limit)
        with self._store.session("audit read") as session:
            return [_record(r) for r in session.exec(query).all()]


# ---------------------------------------------------------------------- the chain


_ORDER = (col(AuditEventRow.at), col(AuditEventRow.segment), col(AuditEventRow.seq))


def _filtered(query: SelectOfScalar[AuditEventRow], *, since: datetime | None,
              until: datetime | None, action: str | None, kid: str | None,
              actor: str | None) -> SelectOfScalar[AuditEventRow]:
    """``query`` narrowed to events in [since, until) matching the given fields."""
    if since is not None:
        query = query.where(col(AuditEventRow.at) >= since)
    if until is not None:
        query = query.where(col(AuditEventRow.at) < until)
    if action is not None:
        query = query.where(AuditEventRow.action == action)
    if kid is not None:
        query = query.where(AuditEventRow.kid == kid)
    if actor is not None:
        query = query.where(AuditEventRow.actor == actor)
    return query


def _head_digest(segments: builtins.list[tuple[str, int, str]]) -> str:
    body = json.dumps(sorted(segments), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _append(
    store: Store, conn: Connection, segment: str, events: builtins.list[dict[str, Any]]
) -> None:
    """Link `events` after the last row of `segment`, inside `conn`'s transaction."""
    if store.dialect == "postgresql":
        # Held to the end of the transaction: one appender at a time on this
        # segment, in every process; other segments append meanwhile.
        # (SQLite: the session began with BEGIN IMMEDIATE, or already holds
        # the write lock through the caller's writes.)
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:s, :k))"),
                     {"s": segment, "k": AUDIT_LOCK})
    last = conn.execute(
        select(col(AuditEventRow.seq), col(AuditEventRow.hash))
        .where(AuditEventRow.segment == segment)
        .order_by(col(AuditEventRow.seq).desc())
        .limit(1)
    ).first()
    seq, prev = (0, GENESIS) if last is None else (int(last[0]), str(last[1]))
    rows = []
    for values in events:
        seq += 1
        digest = _chain_hash(prev, segment, seq, **values)
        rows.append({**values, "segment": segment, "seq": seq, "prev_hash": prev,
                     "hash": digest})
        prev = digest
    conn.execute(insert(AuditEventRow), rows)


def _chain_hash(
    prev_hash: str,
    segment: str,
    seq: int,
    *,
    at: datetime,
    actor: str,
    action: str,
    kid: str | None,
    purpose: str | None,
    outcome: str,
    detail: str,
    payload_hash: str | None,
) -> str:
    # A JSON array has one encoding here (fixed order, no spaces, ASCII), and
    # the detail goes in as the exact stored text, so any edit changes the hash.
    # The segment's name is covered too (not for the legacy chain, hashed
    # before segments existed): events cannot move between segments.
    name = [] if segment == LEGACY else [segment]
    body = json.dumps(
        [*name, seq, utc(at).isoformat(timespec="microseconds"), actor, action, kid, purpose,
         outcome, detail, payload_hash],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _hash_row(row: AuditEventRow) -> str:
    return _chain_hash(
        row.prev_hash, row.segment, row.seq, at=row.at, actor=row.actor, action=row.action,
        kid=row.kid, purpose=row.purpose, outcome=row.outcome, detail=row.detail,
        payload_hash=row.payload_hash,
    )


def _record(row: AuditEventRow) -> AuditRecord:
    detail = json.loads(row.detail)
    return AuditRecord(
        segment=row.segment, seq=row.seq, at=row.at, actor=row.actor, action=row.action,
        kid=row.kid, purpose=row.purpose, outcome=row.outcome,
        detail=detail if isinstance(detail, dict) else {"value": detail},
        payload_hash=row.payload_hash, prev_hash=row.prev_hash, hash=row.hash,
    )


# ---------------------------------------------------------------------- detail guard


def _words(name: str) -> builtins.list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def _clean(value: Any, where: str) -> Any:
    """A JSON-safe copy of `value`; refuses keys that name secret material."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit {where}: key {key!r} is not a string")
            if key.lower() in _SECRET_NAMES or _SECRET_WORDS.intersection(_words(key)):
                raise ValueError(
                    f"audit {where}: key {key!r} names secret material; "
                    "payloads, tokens and key material never go into the audit log"
                )
            out[key] = _clean(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_clean(item, f"{where}[]") for item in value]
    if isinstance(value, Enum):
        return _clean(value.value, where)
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_STRING:
            return value[:MAX_DETAIL_STRING] + "...(truncated)"
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    raise ValueError(f"audit {where}: {type(value).__name__} is not a JSON value")
