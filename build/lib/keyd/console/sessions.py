"""Console sessions: a bearer token once at sign-in, then a cookie.

The cookie carries only a random session id (256 bits); the server keeps
the session (the client's name, its CSRF token, its expiries) and stores it
under the SHA-256 of that id, so nothing in memory can be replayed as a
cookie.  The bearer token itself is never kept: each request looks the
client up by name again, so revoking the client, or taking the admin policy
from it, ends its console sessions at once.

A session ends after ``IDLE`` without a request, after ``ABSOLUTE`` whatever
happens, or at sign-out.  Sessions live in the process that made them (the
console is served by the process the admin's browser talks to).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from keyd.clock import Clock

IDLE = timedelta(minutes=15)
ABSOLUTE = timedelta(hours=8)
MAX_SESSIONS = 1000  # the oldest session is dropped past this: memory stays bounded


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret (CSRF token) with ours."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass
class Session:
    client: str
    csrf: str
    created_at: datetime
    seen_at: datetime
    flashes: list[str] = field(default_factory=list)

    def flash(self, message: str) -> None:
        """A message for the next page this session sees (post-redirect-get)."""
        self.flashes.append(message)

    def take_flashes(self) -> list[str]:
        taken, self.flashes = self.flashes, []
        return taken


class SessionStore:
    def __init__(self, clock: Clock, *, idle: timedelta = IDLE,
                 absolute: timedelta = ABSOLUTE) -> None:
        self._clock = clock
        self.idle, self.absolute = idle, absolute
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, client: str) -> tuple[str, Session]:
        """A new session for ``client``: (the cookie value, the session)."""
        now = self._clock.now()
        session_id = secrets.token_urlsafe(32)
        session = Session(client=client, csrf=secrets.token_urlsafe(32), created_at=now,
                          seen_at=now)
        with self._lock:
            self._purge(now)
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].seen_at)
                del self._sessions[oldest]
            self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value (its idle timer restarted), else None."""
        if not session_id or len(session_id) > 128:
            return None
        now = self._clock.now()
        key = _digest(session_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[key]
                return None
            session.seen_at = now
            return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_digest(session_id), None)

    def end_client(self, client: str) -> None:
        """End every session of ``client`` (it was revoked)."""
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.client == client]:
                del self._sessions[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expired(self, session: Session, now: datetime) -> bool:
        # A clock that went back never extends a session past its absolute end.
        return now - session.seen_at >= self.idle or now - session.created_at >= self.absolute

    def _purge(self, now: datetime) -> None:
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]
