"""keyd's exceptions: one shallow tree, each carrying the values that explain it.

Every error has a fixed machine-readable ``code`` (what API clients branch on)
and an HTTP ``status`` that the API maps it to, both given as class keywords;
a subclass that names no status keeps its parent's.  An error that tells the
client when to come back mixes in :class:`Retryable`.  Foreign exceptions
(hvac, pkcs11, jwcrypto, SQLAlchemy) are converted at the module that calls
the library, with ``raise ... from e``; none escapes into the service or the API.
"""

from __future__ import annotations

from typing import Any, ClassVar


class KeydError(Exception):
    """Base of every error keyd raises on purpose."""

    code: ClassVar[str] = "keyd_error"
    status: ClassVar[int] = 500

    def __init_subclass__(cls, *, code: str | None = None, status: int | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if status is not None:
            cls.status = status

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Retryable(KeydError):
    """An error the client may retry: ``retry_after`` seconds from now (the
    API's ``Retry-After``), by default the class's ``retry_after`` keyword."""

    default_retry_after: ClassVar[int] = 5

    def __init_subclass__(cls, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if retry_after is not None:
            cls.default_retry_after = retry_after

    def __init__(self, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after


class ConfigError(KeydError, code="config_error", status=500):
    """config.toml or a secret source is wrong; the message names the key."""


class BadRequest(KeydError, code="bad_request", status=400):
    """The request is malformed: a field missing, of the wrong type, or unknown."""


class NotFound(KeydError, code="not_found", status=404):
    """No key, client, issuer or page by the name the request gives."""


class Conflict(KeydError, code="conflict", status=409):
    """The request is well-formed but the key's state does not allow it."""


class RotationUnderWay(Conflict, code="rotation_under_way"):
    """A purpose already has its next key (pending, awaiting a certificate, or
    being made): a second rotation would make a second one."""


class LeaseLost(Conflict, code="lease_lost"):
    """Work for the leader refused: this process no longer holds the lease."""


class ClockSkewed(KeydError, code="clock_skewed", status=503):
    """This replica's clock drifted too far from the database's: it makes no
    lifecycle writes (and does not lead) until its time sync is fixed."""


class RequestTimeout(KeydError, code="request_timeout", status=408):
    """The client took too long to send its request (a slow-connection guard)."""


class PayloadTooLarge(KeydError, code="payload_too_large", status=413):
    """A request body (or header) over the configured limit."""


class UnsupportedMediaType(KeydError, code="unsupported_media_type", status=415):
    """A request body of a type keyd does not take: the API takes
    ``application/json``, the console's forms urlencoded or multipart."""


class Unauthorized(KeydError, code="unauthorized", status=401):
    """No credentials, or ones keyd does not accept."""


class Forbidden(KeydError, code="forbidden", status=403):
    """The caller is known, but its policy does not allow this."""


class RateLimited(Retryable, code="rate_limited", status=429, retry_after=1):
    """The caller is over its request rate."""


class InvalidToken(KeydError, code="invalid_token", status=422):
    """A JWS/JWE/JWT that keyd refuses: malformed, off-profile, or hostile."""


class InvalidSignature(InvalidToken, code="invalid_signature"):
    """A JWS whose signature does not verify with the issuer's key."""


class DecryptionFailed(InvalidToken, code="decryption_failed"):
    """One identical error for every tampering case, so there is no oracle."""

    def __init__(self, detail: str = "the JWE could not be decrypted") -> None:
        super().__init__(detail)


class CertificateError(KeydError, code="invalid_certificate", status=400):
    """A certificate or CSR is unusable: wrong key, weak, expired, malformed."""


class IssuerUnavailable(Retryable, code="issuer_unavailable", status=503, retry_after=30):
    """A counterparty's JWKS could not be fetched and no fresh copy is cached."""


class BackendError(KeydError, code="backend_error", status=500):
    """The key backend refused an operation for a reason that is not an outage."""


class Unsupported(BackendError, code="unsupported", status=422):
    """The backend cannot do this at all: an operation or an OAEP hash its
    ``Capabilities`` leave out (RSA-OAEP with SHA-1 on transit, an exportable
    key on an HSM).

    A 422, not a 500: keyd is not failing, the request asks for something
    this deployment does not offer.  Backends decide it before touching any
    key or ciphertext, so it is no oracle.
    """


class BackendUnavailable(BackendError, Retryable, code="backend_unavailable", status=503,
                         retry_after=5):
    """The key backend cannot be reached (sealed, down, token revoked, slow)."""


class KeyNotFound(BackendError, code="key_not_found", status=503):
    """The backend has no key under the given reference.

    503, not 404: the caller named no key; a key the store relies on is gone
    from the backend, so this replica is not ready until the leader's
    recovery replaces it (and says so in an alert)."""


class StoreUnavailable(Retryable, code="store_unavailable", status=503, retry_after=5):
    """The database (or the audit log) cannot be written: fail closed."""
