"""Token operations for callers: sign, client assertion, decrypt, verify, unwrap.

Each call checks the caller's policy first, then does exactly one private-key
operation through the backend, then writes its audit event before the result
is handed back: if the audit cannot be written the caller gets 503 and no
token (fail closed).  Refusals are audited too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from keyd import jose
from keyd.audit import AuditEvent, payload_hash
from keyd.config import IssuerSettings
from keyd.errors import (
    BadRequest,
    InvalidSignature,
    InvalidToken,
    KeydError,
    NotFound,
)
from keyd.issuers import IssuerKeys
from keyd.jose import JweResult, VerifiedJws
from keyd.model import Purpose
from keyd.policy import Operation
from keyd.service import Caller, KeyService, UsableKey

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class Signed:
    token: str
    kid: str


class TokenService:
    def __init__(self, keys: KeyService) -> None:
        self.keys = keys
        self.settings = keys.settings
        self.clock = keys.clock

    # ------------------------------------------------------------------ signing

    def _audit(self, caller: Caller, action: str, key: UsableKey | None, data: bytes | None,
               **detail: Any) -> None:
        self.keys.record(
            AuditEvent(
                actor=caller.name,
                action=action,
                kid=None if key is None else key.kid,
                purpose=None if key is None else key.purpose.value,
                payload_hash=None if data is None else payload_hash(data),
                detail=detail,
            )
        )

    def refuse(self, caller: Caller | None, action: str, error: KeydError) -> None:
        """Record a refusal (``caller`` None: no valid credential was shown).

        A failing audit must not hide the original error, so it is swallowed
        here: the refusal itself already changed nothing.
        """
        try:
            self.keys.record(
                AuditEvent(actor="unauthenticated" if caller is None else caller.name,
                           action=action, outcome="refused",
                           detail={"error": error.code, "status": error.status})
            )
        except KeydError:
            pass

    def sign_jws(
        self,
        caller: Caller,
        payload: bytes,
        *,
        header: dict[str, Any] | None = None,
        detached: bool = False,
        claims_in_header: bool = False,
    ) -> Signed:
        caller.policy.require(Operation.SIGN, Purpose.SIGNING)
        # The policy's scope binds what keyd signs, wherever it sits: claims in
        # a JSON-object payload, extra protected headers, and the iss keyd
        # itself puts into a message signature's header.
        claims = jose.json_object_content(payload, "the payload", BadRequest)
        if claims is not None:
            caller.policy.require_signable(claims, "the payload's")
        if header is not None:
            caller.policy.require_scope(header, "the header's")
        if claims_in_header:
            caller.policy.require_client_id(self.settings.keyd.client_id)
        key, signer = self.keys.active_signer()
        token = jose.sign_jws(
            signer, key.kid, payload, extra_header=header, detached=detached,
            claims_in_header=claims_in_header, iss=self.settings.keyd.client_id,
            now=self.clock.now(),
        )
        self._audit(caller, "sign.jws", key, payload, detached=detached)
        return Signed(token, key.kid)

    def sign_jwt(self, caller: Caller, claims: dict[str, Any], ttl: int) -> Signed:
        caller.policy.require(Operation.SIGN, Purpose.SIGNING)
        # A caller may not speak for another participant: iss and sub, when
        # given, must be client_ids its policy may assert, every aud one of
        # its audiences.  keyd adds exp, so iss = sub with an aud is a client
        # assertion and needs that operation.
        caller.policy.require_signable({"exp": 0, **claims}, "claim")
        key, signer = self.keys.active_signer()
        token = jose.sign_jwt(signer, key.kid, claims, ttl=ttl, now=self.clock.now())
        self._audit(caller, "sign.jwt", key, json.dumps(claims, sort_keys=True).encode())
        return Signed(token, key.kid)

    def client_assertion(self, caller: Caller, audience: str, client_id: str | None) -> Signed:
        caller.policy.require(Operation.CLIENT_ASSERTION, Purpose.SIGNING)
        client_id = client_id or self.settings.keyd.client_id
        caller.policy.require_client_id(client_id)
        caller.policy.require_audience(audience)
        key, signer = self.keys.active_signer()
        token = jose.client_assertion(
            signer, key.kid, client_id=client_id, audience=audience,
            now=self.clock.now(),
        )
        self._audit(caller, "sign.client_assertion", key, None, client_id=client_id,
                    audience=audience)
        return Signed(token, key.kid)

    # ------------------------------------------------------------------ decryption

    def decrypt_jwe(self, caller: Caller, compact: str) -> JweResult:
        """The plaintext and header, with the kid of our key that decrypted it."""
        caller.policy.require(Operation.DECRYPT, Purpose.ENCRYPTION)
        header = jose.parse_jwe_header(compact)
        kid = header.get("kid")
        if kid is None:
            key = self.keys.active_key(Purpose.ENCRYPTION)
        else:
            found = self.keys.published_key(kid) if isinstance(kid, str) else None
            if found is None or found.purpose is not Purpose.ENCRYPTION:
                # A JWE to our signing key (or to no key of ours) is refused
                # without any RSA operation.
                raise InvalidToken("the JWE is not addressed to a published encryption key")
            key = found
        if not key.state.may_decrypt:
            raise InvalidToken(f"key {key.kid} is {key.state.value}; it no longer decrypts")
        # Vault transit decrypts RSA-OAEP with SHA-256 only: refused here before
        # any RSA work (the header's alg is public, so this reveals nothing).
        unwrap_cek = self.keys.cek_unwrapper(key, header.get("alg"))
        result = jose.decrypt_jwe(compact, unwrap_cek)
        self._audit(caller, "decrypt.jwe", key, result.plaintext, alg=header.get("alg"),
                    enc=header.get("enc"))
        return replace(result, kid=key.kid)

    # ------------------------------------------------------------------ verification

    def _issuer(self, issuer: str) -> tuple[IssuerKeys, IssuerSettings]:
        keys = self.keys.issuers.get(issuer)
        settings = self.settings.issuers.get(issuer)
        if keys is None or settings is None:
            raise NotFound(f"no issuer {issuer[:64]!r} in config; have "
                           f"{sorted(self.settings.issuers)}")
        return keys, settings

    def _check_claims(self, content: bytes, settings: IssuerSettings, what: str) -> None:
        """The claims of verified (or unwrapped) content, when it is a JSON
        object: exp/nbf/iat integers that hold, and the issuer's iss."""
        claims = jose.json_object_content(content, what)
        if claims is None:
            return
        jose.check_time_claims(claims, now=self.clock.now(), leeway=settings.leeway, what=what)
        if settings.iss and "iss" in claims and claims["iss"] != settings.iss:
            # Exact equality: a list or a substring never matches.
            raise InvalidToken(f"{what} iss {str(claims['iss'])[:64]!r} is not this issuer's "
                               f"({settings.iss!r})")

    def verify_jws(
        self, caller: Caller, compact: str, issuer: str, payload_b64: str | None = None
    ) -> VerifiedJws:
        caller.policy.require(Operation.VERIFY)
        keys, settings = self._issuer(issuer)
        now = self.clock.now()

        def seen_before(jti: str, expires: datetime) -> bool:
            return not self.keys.remember_jti(issuer, jti, expires, now=now)

        result = jose.verify_jws(
            compact,
            keys.key,
            algorithms=settings.algorithms,
            now=now,
            payload_b64=payload_b64,
            iat_max_age=settings.iat_max_age,
            max_future=settings.leeway,
            replay=seen_before,
            expected_iss=settings.iss or None,
            require=settings.require,
            check_payload=lambda payload: self._check_claims(payload, settings, "the payload"),
        )
        self._audit(caller, "verify.jws", None, result.payload, issuer=issuer,
                    signer_kid=result.kid)
        return result

    def unwrap(self, caller: Caller, compact: str, issuer: str) -> tuple[VerifiedJws, JweResult]:
        """PayNet's signed-then-encrypted response: verify the JWS, then decrypt its JWE."""
        verified = self.verify_jws(caller, compact, issuer)
        try:
            inner = verified.payload.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidToken("the JWS payload is not a compact JWE") from None
        decrypted = self.decrypt_jwe(caller, inner)
        # The claims that matter are inside the encrypted response.
        self._check_claims(decrypted.plaintext, self._issuer(issuer)[1], "the decrypted payload")
        return verified, decrypted

    def verify_universal_link(
        self, caller: Caller, url: str, issuer: str
    ) -> tuple[str, VerifiedJws]:
        caller.policy.require(Operation.VERIFY)
        _, settings = self._issuer(issuer)
        link = jose.parse_universal_link(url)
        # Prefixes end their authority (config checks they end in "/"), so a
        # plain startswith cannot be fooled by https://dp.example.my.evil.test.
        if settings.link_prefixes and not url.startswith(settings.link_prefixes):
            raise InvalidToken(f"the link is not under an allowed prefix of issuer {issuer!r}: "
                            f"{list(settings.link_prefixes)}")
        if settings.redirect_uri_prefixes and not (
            link.redirect_uri is not None
            and link.redirect_uri.startswith(settings.redirect_uri_prefixes)
        ):
            raise InvalidToken(f"the link's redirect_uri is not under an allowed prefix of issuer "
                            f"{issuer!r}: {list(settings.redirect_uri_prefixes)}")
        verified = self.verify_jws(caller, link.signature, issuer)
        if verified.payload != link.consent_id.encode():
            raise InvalidSignature("the signature does not cover this link's consent_id")
        return link.consent_id, verified
