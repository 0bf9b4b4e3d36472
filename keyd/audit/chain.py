"""The hash chains: linking events, verifying segments, heads and anchors.

Every row carries ``hash = sha256(prev_hash || canonical_json(fields))``, a
segment's first row chaining from 64 zeros.  Editing, deleting or reordering
a row breaks its segment's chain at that row.  Cutting rows off a segment's
end, or dropping a segment, leaves valid chains: the head (a digest over
every segment's name, length and last hash), exported and recorded in
``audit_heads``, is what ``reaches`` checks that against.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keyd.clock import Clock, utc
from keyd.store import audit as sql
from keyd.store.db import Store
from keyd.store.tables import AuditEventRow

GENESIS = "0" * 64
LEGACY = "legacy"  # the segment of the events written before segments (migration 0005)
_VERIFY_BATCH = 5000  # rows read per query while verifying

_HEAD = re.compile(r"^(0|[1-9][0-9]{0,18}):([0-9a-f]{64})$")


def parse_head(text: str) -> tuple[int, str]:
    """``LENGTH:HASH`` as ``keyd audit head`` prints it; ValueError otherwise."""
    m = _HEAD.match(text.strip())
    if not m:
        raise ValueError(f"{text[:80]!r} is not LENGTH:HASH (as `keyd audit head` prints it)")
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class Broken:
    """The first event where a segment's chain breaks."""

    segment: str
    seq: int

    def __str__(self) -> str:
        return f"{self.seq} of segment {self.segment}"


def append(conn: Connection, segment: str, events: list[dict[str, Any]]) -> None:
    """Link ``events`` after the last row of ``segment``, inside ``conn``'s transaction.

    The segment's lock is held to the transaction's end: one appender at a
    time on it, in every process, so it never forks.
    """
    sql.lock_segment(conn, segment)
    last = sql.last_link(conn, segment)
    seq, prev = (0, GENESIS) if last is None else last
    rows = []
    for values in events:
        seq += 1
        digest = chain_hash(prev, segment, seq, **values)
        rows.append({**values, "segment": segment, "seq": seq, "prev_hash": prev,
                     "hash": digest})
        prev = digest
    sql.insert_events(conn, rows)


def chain_hash(
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


def hash_row(row: AuditEventRow) -> str:
    return chain_hash(
        row.prev_hash, row.segment, row.seq, at=row.at, actor=row.actor, action=row.action,
        kid=row.kid, purpose=row.purpose, outcome=row.outcome, detail=row.detail,
        payload_hash=row.payload_hash,
    )


def verify(store: Store) -> Broken | None:
    """None when every segment's chain is whole, else its first broken event."""
    with store.session("audit verify") as session:
        names = sql.segment_names(session)
    for segment in names:
        seq = _first_break(store, segment)
        if seq is not None:
            return Broken(segment, seq)
    return None


def _first_break(store: Store, segment: str) -> int | None:
    prev, expected, after = GENESIS, 1, 0
    while True:
        with store.session("audit verify") as session:
            rows = sql.segment_rows(session, segment, after, _VERIFY_BATCH)
        if not rows:
            return None
        for row in rows:
            # A gap (a deleted row) or an edited row shows up here: the
            # seq, the link to the row before, or the row's own hash.
            if row.seq != expected or row.prev_hash != prev or hash_row(row) != row.hash:
                return row.seq
            prev, expected = row.hash, row.seq + 1
        after = rows[-1].seq


def segments(store: Store) -> list[tuple[str, int, str]]:
    """Every segment's ``(name, length, hash of its newest event)``, sorted."""
    with store.session("audit head") as session:
        return sql.segment_heads(session)


def head_digest(segments: list[tuple[str, int, str]]) -> str:
    body = json.dumps(sorted(segments), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def head(store: Store, clock: Clock) -> tuple[int, str]:
    """``(events, digest over every segment's (name, length, head))``;
    ``(0, GENESIS)`` when empty.  Recorded in the store, so that
    ``reaches()`` can check every segment against it later."""
    found = segments(store)
    if not found:
        return 0, GENESIS
    length = sum(n for _, n, _ in found)
    digest = head_digest(found)
    values = {"hash": digest, "length": length,
              "segments": json.dumps(found, separators=(",", ":")),
              "recorded_at": utc(clock.now())}
    session = store.active_session()
    if session is not None:  # inside the caller's transaction: join it
        with store.converted("audit head"):
            sql.record_head(session.connection(), values)
    else:
        with store.session("audit head", write=True) as s:
            sql.record_head(s.connection(), values)
    return length, digest


def reaches(store: Store, length: int, digest: str) -> str | None:
    """None when every segment still reaches the length and hash it had at
    head ``length:digest`` (recorded earlier), else why not.  ``verify()``
    checks the links; this checks the anchor."""
    if length == 0:
        return None if digest == GENESIS else "the head of an empty chain is 64 zeros"
    with store.session("audit anchor") as session:
        recorded = sql.recorded_head(session, digest)
        if recorded is None or recorded.length != length:
            return ("this store never had that head: it was rewritten "
                    "or is another store")
        stored: list[tuple[str, int, str, str | None]] = [
            (segment, n, hash_, sql.event_hash(session, segment, n))
            for segment, n, hash_ in json.loads(recorded.segments)
        ]
    current = {name: n for name, n, _ in segments(store)}
    for segment, n, hash_, now in stored:
        if now is None:
            return (f"segment {segment} has {current.get(segment, 0)} events but reached "
                    f"{n}:{hash_[:16]}... before: events were cut off its end")
        if now != hash_:
            return (f"event {n} of segment {segment} has hash {now[:16]}..., not the "
                    f"recorded {hash_[:16]}...: the chain was rewritten")
    return None
