"""Counterparties' JWKS (PayNet's, others'): fetched, filtered, cached.

A JWKS is untrusted input from the network, so (THREATS "Counterparty JWKS"):
- a fetch is bounded in time (an overall deadline, so a server dripping one
  byte a second cannot hold us) and in size, follows no redirect, and must
  answer 200 with a JSON object holding a ``keys`` list;
- only sound public keys are kept (``keyd.jose.keys``: RSA of 2048-8192 bits
  with an odd modulus and an odd e >= 65537, EC P-256/384/521 points on their
  curve; here: an ``x5c`` leaf that holds the JWK's own key); keys with
  private members, without a kid, or whose kid appears twice are dropped,
  each logged with its reason and shown by ``keyd status``;
- a failed fetch, or one that yields no usable key, never replaces the last
  good set; that set is used while younger than ``max_age``, then we fail
  closed with IssuerUnavailable (503);
- fetches are rate-limited: a kid storm (random kids in many requests)
  causes at most one refetch per ``refetch_cooldown``, and while the issuer
  is down callers are not each made to wait out a timeout.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
from cryptography import x509

from keyd.clock import Clock
from keyd.config import IssuerSettings
from keyd.errors import InvalidToken, IssuerUnavailable, KeydError
from keyd.jose.compact import MAX_KID_CHARS, show, strict_json
from keyd.jose.jwks import same_public_key
from keyd.jose.keys import IssuerKey, issuer_key

log = logging.getLogger("keyd.issuers")


class _FetchFailed(Exception):
    """Internal: why a fetch produced nothing usable (goes into last_error)."""


def _leaf_certificate(entry: dict[str, Any], key: IssuerKey) -> x509.Certificate | None:
    """The ``x5c`` leaf, which must hold exactly the JWK's key (else _FetchFailed):
    its expiry drives our alerts, and a certificate for another key would make
    them about the wrong thing."""
    if "x5c" not in entry:
        return None
    chain = entry["x5c"]
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise _FetchFailed("x5c is not a list of base64 certificates")
    try:
        leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        leaf_key = leaf.public_key()
    except (binascii.Error, ValueError) as e:
        raise _FetchFailed(f"x5c leaf is not a certificate: {show(str(e), 80)}") from e
    if not key.may_verify:
        # Only the certificates of signing keys are watched for expiry.
        raise _FetchFailed(f"the JWK cannot verify (use {show(key.use)}, "
                           f"key_ops {show(key.key_ops)})")
    if not same_public_key(leaf_key, key.public):
        raise _FetchFailed("the x5c leaf certificate does not hold the JWK's key")
    return leaf


def usable_keys(
    document: object,
) -> tuple[dict[str, IssuerKey], list[x509.Certificate], list[str]]:
    """``(kid -> key, leaf certificates, reasons for dropped keys)`` of a JWKS document."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchFailed('the JWKS is not a JSON object with a "keys" list')
    entries = [e for e in document["keys"] if isinstance(e, dict)]
    dropped = [
        f"entry {i} is not an object"
        for i, e in enumerate(document["keys"])
        if not isinstance(e, dict)
    ]
    counts = Counter(e.get("kid") for e in entries if isinstance(e.get("kid"), str))
    keys: dict[str, IssuerKey] = {}
    certs: list[x509.Certificate] = []
    for entry in entries:
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            dropped.append(f"a key without a usable kid ({show(kid)})")
            continue
        if counts[kid] > 1:
            # Which of the two is meant is ambiguous: neither is trusted.
            dropped.append(f"kid {show(kid)} appears {counts[kid]} times")
            continue
        try:
            key = issuer_key(entry)
            cert = _leaf_certificate(entry, key)
        except (_FetchFailed, InvalidToken) as e:
            dropped.append(f"kid {show(kid)}: {e}")
            continue
        keys[kid] = key
        if cert is not None:
            certs.append(cert)
    return keys, certs, dropped


class FetchPending(Exception):  # noqa: N818 - a signal to the API, not an error
    """The key lookup needs a JWKS fetch that is under way.

    Raised only inside ``defer_fetches()`` (the local API's worker threads),
    so no worker thread is parked on a slow issuer: the API awaits ``future``
    on its event loop, at most ``timeout`` seconds, and then calls again.
    """

    def __init__(self, future: Future[bool], timeout: float, issuer: str) -> None:
        super().__init__(f"issuer {issuer}: JWKS fetch under way")
        self.future, self.timeout, self.issuer = future, timeout, issuer


_deferring = threading.local()


@contextmanager
def defer_fetches() -> Iterator[None]:
    """Within this block (on this thread) a lookup that would wait for a fetch
    raises FetchPending instead of blocking."""
    before = getattr(_deferring, "on", False)
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = before


class IssuerKeys:
    """One counterparty's signing keys, as its ``jwks_uri`` publishes them.

    Isolation (THREATS "issuer isolation"): a fetch runs on its own thread and
    holds no lock while it talks to the network; the lock guards only the
    swap of the cached set.  Lookups of a known kid answer from the cache at
    once (a due refresh starts in the background); only a lookup that cannot
    be answered without the fetch waits for it, together with every other
    such lookup (one fetch, however many callers), and at most
    ``fetch_timeout`` seconds.
    """

    def __init__(
        self, settings: IssuerSettings, clock: Clock, client: httpx.Client | None = None
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._own_client = client is None
        self._client = client or httpx.Client(follow_redirects=False, trust_env=False)
        self._lock = threading.Lock()  # never held across network I/O
        self._keys: dict[str, IssuerKey] = {}
        self._certs: list[x509.Certificate] = []
        self._inflight: Future[bool] | None = None
        self.fetched_at: datetime | None = None  # when the cached set was fetched
        self.attempted_at: datetime | None = None  # the last fetch, good or bad
        self.last_error: str | None = None
        self.dropped: list[str] = []  # why keys of the last good fetch were ignored
        self.fetch_count = 0

    # ------------------------------------------------------------------ public

    def key(self, kid: str) -> IssuerKey | None:
        """The key published under ``kid``, or None when the issuer has none.

        Raises IssuerUnavailable when no set younger than ``max_age`` is at hand
        (or the fetch it waited for did not end within ``fetch_timeout``), and
        FetchPending instead of waiting inside ``defer_fetches()``.
        """
        if not isinstance(kid, str):
            return None
        with self._lock:
            now = self._clock.now()
            fresh = self._fresh(now)
            found = self._keys.get(kid) if fresh else None
            if found is not None:
                if self._refresh_due(now) and self._inflight is None and self._cooled_down(now):
                    self._start_fetch(now)  # in the background: the cached key answers now
                return found
            if self._inflight is not None:
                pending = self._inflight  # join the fetch under way
            elif self._cooled_down(now):
                # Never fetched, stale, or perhaps the issuer rotated: one
                # fetch, then no more until the cool-down has passed, however
                # many unknown kids arrive.
                pending = self._start_fetch(now)
            elif fresh:
                return None
            else:
                raise self._unavailable(now)
        self._wait(pending)
        with self._lock:
            now = self._clock.now()
            if not self._fresh(now):
                raise self._unavailable(now)
            return self._keys.get(kid)

    def certificates(self) -> list[x509.Certificate]:
        with self._lock:
            return list(self._certs)

    def cached_keys(self) -> dict[str, IssuerKey]:
        """The last good set as cached (kid -> key), fetching nothing (the console)."""
        with self._lock:
            return dict(self._keys)

    def refresh(self) -> None:
        """Fetch now, whatever the cool-down; IssuerUnavailable when it fails."""
        with self._lock:
            pending = self._inflight or self._start_fetch(self._clock.now())
        if not pending.result(timeout=self.settings.fetch_timeout * 2):
            raise IssuerUnavailable(
                f"issuer {self.settings.name}: {self.last_error}", self._retry_after()
            )

    def settle(self, timeout: float) -> bool:
        """Wait for a fetch under way (a background refresh) to end; False on timeout."""
        with self._lock:
            pending = self._inflight
        if pending is None:
            return True
        try:
            pending.result(timeout=timeout)
        except FutureTimeout:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """What ``keyd status`` shows: the kept kids, the dropped keys and why."""
        with self._lock:
            return {
                "issuer": self.settings.name,
                "jwks_uri": self.settings.jwks_uri,
                "fetched_at": None if self.fetched_at is None else self.fetched_at.isoformat(),
                "kids": sorted(self._keys),
                "dropped": list(self.dropped),
                "last_error": self.last_error,
            }

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    # ------------------------------------------------------------------ inner

    def _fresh(self, now: datetime) -> bool:
        return self.fetched_at is not None and now - self.fetched_at < self.settings.max_age

    def _refresh_due(self, now: datetime) -> bool:
        # Refresh at half of max_age, so a failing issuer still leaves the
        # other half during which the last good set keeps working.
        return self.fetched_at is None or now - self.fetched_at >= self.settings.max_age / 2

    def _cooled_down(self, now: datetime) -> bool:
        return self.attempted_at is None or (
            now - self.attempted_at >= self.settings.refetch_cooldown
        )

    def _retry_after(self) -> int:
        return max(1, int(self.settings.refetch_cooldown.total_seconds()))

    def _unavailable(self, now: datetime) -> IssuerUnavailable:
        age = "never fetched" if self.fetched_at is None else f"fetched at {self.fetched_at}"
        return IssuerUnavailable(
            f"issuer {self.settings.name}: no JWKS younger than {self.settings.max_age} "
            f"({age}; last error: {self.last_error})",
            self._retry_after(),
        )

    def _wait(self, pending: Future[bool]) -> None:
        timeout = self.settings.fetch_timeout
        if getattr(_deferring, "on", False) and not pending.done():
            raise FetchPending(pending, timeout, self.settings.name)
        try:
            pending.result(timeout=timeout)
        except FutureTimeout:
            raise IssuerUnavailable(
                f"issuer {self.settings.name}: the JWKS fetch did not finish within "
                f"{timeout:g} s", self._retry_after()
            ) from None

    def _start_fetch(self, now: datetime) -> Future[bool]:
        """Start one fetch on its own thread (the caller holds the lock)."""
        self.attempted_at = now
        self.fetch_count += 1
        pending: Future[bool] = Future()
        self._inflight = pending
        threading.Thread(target=self._fetch, args=(now, pending), daemon=True,
                         name=f"keyd-jwks-{self.settings.name}").start()
        return pending

    def _fetch(self, now: datetime, pending: Future[bool]) -> None:
        """One bounded fetch, outside the lock; replaces the cache only with a usable set."""
        error: str | None = None
        try:
            body = self._download()
            document = strict_json(body, "the JWKS", InvalidToken)
            keys, certs, dropped = usable_keys(document)
            if not keys:
                raise _FetchFailed(f"the JWKS holds no usable key ({'; '.join(dropped[:5])})")
        except (_FetchFailed, KeydError) as e:
            error = f"{self.settings.jwks_uri}: {e}"
        except Exception as e:  # noqa: BLE001 - a waiter must wake whatever broke
            log.exception("issuer %s: JWKS fetch failed", self.settings.name)
            error = f"{self.settings.jwks_uri}: {type(e).__name__}"
        with self._lock:
            self._inflight = None
            if error is None:
                if dropped != self.dropped:
                    for reason in dropped:
                        log.warning("issuer %s: key dropped: %s", self.settings.name, reason)
                self._keys, self._certs, self.dropped = keys, certs, dropped
                self.fetched_at = now
            self.last_error = error
        pending.set_result(error is None)

    def _download(self) -> bytes:
        limit = self.settings.max_bytes
        total = self.settings.fetch_timeout
        # Each network step gets a third of the budget and the stream as a
        # whole two thirds: a chunk arriving just before the deadline plus one
        # more read still ends within fetch_timeout.
        deadline = time.monotonic() + total * 2 / 3
        step = httpx.Timeout(total / 3)
        try:
            with self._client.stream(
                "GET",
                self.settings.jwks_uri,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=step,
                follow_redirects=False,  # a redirect is a failed fetch, not a new URL
            ) as response:
                if response.status_code != 200:
                    raise _FetchFailed(f"answered HTTP {response.status_code}, not 200")
                if response.headers.get("content-encoding", "identity") != "identity":
                    raise _FetchFailed("answered with a content-encoding; asked for identity")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _FetchFailed(f"announces {declared} bytes; the limit is {limit}")
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise _FetchFailed(f"sent more than {limit} bytes")
                    if time.monotonic() > deadline:
                        raise _FetchFailed(f"took longer than {total} s")
                return bytes(body)
        except httpx.TimeoutException as e:
            raise _FetchFailed(f"timed out ({type(e).__name__})") from e
        except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL, OSError) as e:
            raise _FetchFailed(f"failed: {type(e).__name__}: {show(str(e), 120)}") from e
