"""keyd's exceptions: one shallow tree, each carrying the values that explain it.

Every error has a fixed machine-readable ``code`` (what API clients branch on)
and an HTTP ``status`` that the API maps it to.  Foreign exceptions (hvac,
pkcs11, httpx, SQLAlchemy) are converted at the module that calls the
library, with ``raise ... from e``; none escapes into the service or the API.
"""

from __future__ import annotations


class KeydError(Exception):
    """Base of every error keyd raises on purpose."""

    code = "keyd_error"
    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(KeydError):
    """config.toml or a secret source is wrong; the message names the key."""

    code = "config_error"
    status = 500


class BadRequest(KeydError):
    code = "bad_request"
    status = 400


class NotFound(KeydError):
    code = "not_found"
    status = 404


class Conflict(KeydError):
    """The request is well-formed but the key's state does not allow it."""

    code = "conflict"
    status = 409


class RotationUnderWay(Conflict):
    """A purpose already has its next key (pending, awaiting a certificate, or
    being made): a second rotation would make a second one."""

    code = "rotation_under_way"


class LeaseLost(Conflict):
    """Work for the leader refused: this process no longer holds the lease."""

    code = "lease_lost"


class ClockSkewed(KeydError):
    """This replica's clock drifted too far from the database's: it makes no
    lifecycle writes (and does not lead) until its time sync is fixed."""

    code = "clock_skewed"
    status = 503


class RequestTimeout(KeydError):
    """The client took too long to send its request (a slow-connection guard)."""

    code = "request_timeout"
    status = 408


class PayloadTooLarge(KeydError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(KeydError):
    """A request body that is not ``application/json``."""

    code = "unsupported_media_type"
    status = 415


class Unauthorized(KeydError):
    code = "unauthorized"
    status = 401


class Forbidden(KeydError):
    code = "forbidden"
    status = 403


class RateLimited(KeydError):
    code = "rate_limited"
    status = 429

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class InvalidToken(KeydError):
    """A JWS/JWE/JWT that keyd refuses: malformed, off-profile, or hostile."""

    code = "invalid_token"
    status = 422


class InvalidSignature(InvalidToken):
    code = "invalid_signature"


class DecryptionFailed(InvalidToken):
    """One identical error for every tampering case, so there is no oracle."""

    code = "decryption_failed"

    def __init__(self, detail: str = "the JWE could not be decrypted") -> None:
        super().__init__(detail)


class CertificateError(KeydError):
    """A certificate or CSR is unusable: wrong key, weak, expired, malformed."""

    code = "invalid_certificate"
    status = 400


class IssuerUnavailable(KeydError):
    """A counterparty's JWKS could not be fetched and no fresh copy is cached."""

    code = "issuer_unavailable"
    status = 503

    def __init__(self, detail: str, retry_after: int = 30) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class BackendError(KeydError):
    """The key backend refused an operation for a reason that is not an outage."""

    code = "backend_error"
    status = 500


class Unsupported(BackendError):
    """The backend cannot do this at all: an operation or an OAEP hash its
    ``Capabilities`` leave out (RSA-OAEP with SHA-1 on transit, an exportable
    key on an HSM).

    A 422, not a 500: keyd is not failing, the request asks for something
    this deployment does not offer.  Backends decide it before touching any
    key or ciphertext, so it is no oracle.
    """

    code = "unsupported"
    status = 422


class BackendUnavailable(BackendError):
    """The key backend cannot be reached (sealed, down, token revoked, slow)."""

    code = "backend_unavailable"
    status = 503

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class KeyNotFound(BackendError):
    """The backend has no key under the given reference.

    503, not 404: the caller named no key; a key the store relies on is gone
    from the backend, so this replica is not ready until the leader's
    recovery replaces it (and says so in an alert)."""

    code = "key_not_found"
    status = 503


class StoreUnavailable(KeydError):
    """The database (or the audit log) cannot be written: fail closed."""

    code = "store_unavailable"
    status = 503

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
