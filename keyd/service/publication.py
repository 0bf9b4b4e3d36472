"""Publication: the hot path's cached view of the published keys, and the JWKS.

The cache is reloaded at most every KEY_CACHE_SECONDS; a change made through
this process calls ``invalidate`` (ServiceCore) and is seen at once.
"""

from __future__ import annotations

import hashlib
import logging
import time

from keyd import jose, x509
from keyd.errors import Conflict, StoreUnavailable
from keyd.model import KeyState, Purpose
from keyd.store import queries

from .core import ServiceCore
from .values import UsableKey, load_public

log = logging.getLogger("keyd.service")

# How long the hot path trusts its cached view of the active keys.  Admin calls
# made through this process invalidate it at once; another process's change
# (the CLI) is seen within this bound.
KEY_CACHE_SECONDS = 1.0

# While the store is down, the JWKS is served from its last good copy and the
# store is tried again after this many seconds.
STORE_RETRY = 2.0


class Publication(ServiceCore):
    def _refresh(self) -> None:
        """Reload the usable keys when the cached view is older than the bound."""
        if time.monotonic() - self._loaded_at < KEY_CACHE_SECONDS:
            return
        with self.store.session() as session:
            rows = queries.published_keys(session)
            usable = {
                k.kid: UsableKey(k.id, k.kid, Purpose(k.purpose), KeyState(k.state), k.backend_ref)
                for k in rows
                if k.kid is not None
            }
        active = {u.purpose: u for u in usable.values() if u.state is KeyState.ACTIVE}
        with self._lock:
            if usable != self._usable:
                self._jwks = None
            self._usable, self._active = usable, active
            self._loaded_at = time.monotonic()

    def active_key(self, purpose: Purpose) -> UsableKey:
        self._refresh()
        key = self._active.get(purpose)
        if key is None:
            raise Conflict(f"no active {purpose.value} key: run `keyd init`")
        return key

    def published_key(self, kid: str) -> UsableKey | None:
        """A published key by kid; the kid is only ever a dictionary key here."""
        self._refresh()
        return self._usable.get(kid)

    def jwks(self) -> tuple[bytes, str]:
        """The public JWKS document and its content-derived ETag.

        While the store is down the last good copy is served (SPEC: the JWKS
        stays up), and the store is asked again only every STORE_RETRY
        seconds, so an outage does not make every fetch wait out a timeout.
        """
        last = self._jwks_last_good
        if last is not None and time.monotonic() < self._store_down_until:
            return last
        try:
            document = self._current_jwks()
        except StoreUnavailable as e:
            if last is None:
                raise
            self._store_down_until = time.monotonic() + STORE_RETRY
            log.warning("serving the last good JWKS: %s", e.detail)
            return last
        self._jwks_last_good = document
        return document

    def _current_jwks(self) -> tuple[bytes, str]:
        self._refresh()
        with self._lock:
            cached = self._jwks
        if cached is not None:
            return cached
        publish = {Purpose.SIGNING, Purpose.ENCRYPTION}
        if self.settings.keyd.publish_transport:
            publish.add(Purpose.TRANSPORT)
        keys: list[dict[str, object]] = []
        with self.store.session() as session:
            # The active key first: an encrypter that takes the first `enc` key
            # of the set then picks the active one, not a retired one on its
            # way to destruction.
            rank = {KeyState.ACTIVE.value: 0, KeyState.PENDING.value: 1}
            for key in sorted(queries.published_keys(session), key=lambda k: rank.get(k.state, 2)):
                purpose = Purpose(key.purpose)
                cert = queries.current_certificate(session, key.id)
                if purpose not in publish or key.kid is None or cert is None:
                    continue
                chain = x509.load_chain(cert.chain_pem.encode())
                keys.append(
                    jose.public_jwk(
                        load_public(key.public_key_pem), kid=key.kid, use=purpose.jwk_use,
                        alg=purpose.jwk_alg, chain=chain,
                    )
                )
        body = jose.jwks_document(keys)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        with self._lock:
            self._jwks = (body, etag)
        return body, etag
