"""A year of simulated time through the real KeyService and the reconciler.

A verifier and an encrypter each hold the JWKS they fetched up to 15 minutes
ago (PayNet's cache).  Every 15 minutes near a lifecycle event (and every few
hours in between, when nothing can change) the reconciler runs, a token is
signed and checked against the stale set, and a JWE is made to the stale
set's encryption key and decrypted by keyd.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from joserfc import jwe, jwt
from joserfc.jwk import KeySet

from keyd import lifecycle
from keyd.clock import SettableClock
from keyd.model import Purpose
from keyd.tokens import TokenService
from tests.test_jobs import T0, Recorder, jobs_for, open_service

pytestmark = pytest.mark.slow  # a simulated year: minutes of signing and reconciling

STEP = timedelta(minutes=15)
NEAR = timedelta(days=1)
YEAR = timedelta(days=365)
PREPUBLISH = timedelta(days=2)
OVERLAP = timedelta(days=7)


def test_a_year_of_rotations_never_shows_a_verifier_an_unknown_kid(tmp_path: Path) -> None:
    clock = SettableClock(T0)
    life = {"rotate_after": "90d", "prepublish": "2d", "overlap": "7d"}
    service = open_service(tmp_path, clock,
                           {"lifecycle.signing": life, "lifecycle.encryption": life})
    try:
        service.init()
        jobs = jobs_for(service, Recorder())
        tokens = TokenService(service)
        caller = service.admin_caller()
        settings = service.settings
        first_published: dict[str, datetime] = {}
        last_published: dict[str, datetime] = {}
        first_signed: dict[str, datetime] = {}
        last_signed: dict[str, datetime] = {}
        initial = service.active_key(Purpose.SIGNING).kid

        def fetch() -> KeySet:
            service.invalidate()
            document = json.loads(service.jwks()[0])
            now = clock.now()
            for key in document["keys"]:
                first_published.setdefault(key["kid"], now)
                last_published[key["kid"]] = now
            return KeySet.import_key_set(document)

        cached = fetch()  # the verifier's copy, refreshed every 15 minutes
        steps = 0
        while clock.now() < T0 + YEAR:
            now = clock.now()
            jobs.run()
            service.invalidate()
            signed = tokens.sign_jwt(caller, {"step": steps}, 600)
            first_signed.setdefault(signed.kid, now)
            last_signed[signed.kid] = now
            # The stale set knows the signer: it was published prepublish ago.
            jwt.decode(signed.token, cached, algorithms=["PS256"])
            enc_key = next(k for k in cached.keys if k.get("use") == "enc")
            message = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM",
                                           "kid": enc_key.kid}, b"hello", enc_key,
                                          algorithms=["RSA-OAEP-256", "A256GCM"])
            assert tokens.decrypt_jwe(caller, message).plaintext == b"hello"
            cached = fetch()
            steps += 1
            upcoming = [lifecycle.next_event(service.key_times(p), settings.lifecycle[p])
                        for p in settings.enabled_purposes()]
            nxt = min((u for u in upcoming if u is not None), default=T0 + YEAR)
            if nxt - clock.now() > NEAR + STEP:
                clock.set(nxt - NEAR)  # nothing can change before then
            else:
                clock.advance(STEP)

        signing_kids = sorted(first_signed, key=lambda k: first_signed[k])
        assert len(signing_kids) >= 4, signing_kids  # rotations at ~92, 184, 276 days
        for kid in signing_kids:
            if kid != initial:  # the very first key signs from init
                assert first_signed[kid] - first_published[kid] >= PREPUBLISH, kid
        for kid in signing_kids[:-1]:
            # Still published `overlap` after its last signature (to within one step).
            assert last_published[kid] - last_signed[kid] >= OVERLAP - STEP, kid
        assert steps < 6000, steps
        actives = [k for k in service.keys() if k.state.value == "active"]
        assert sorted(k.purpose.value for k in actives) == ["encryption", "signing"]
    finally:
        service.close()
