"""The ``vault`` backend: RSA keys held by a Vault / OpenBao transit engine.

Signing and encryption keys are created non-exportable, so the private halves
never leave Vault; keyd only ever sees public keys, signatures and decrypted
content keys.  Transport keys are exportable only when the config asks for a
deployable TLS key.

Faults (THREATS "Faults"): a sealed, unreachable or slow Vault and a revoked
token all become :class:`BackendUnavailable` within ``timeout`` seconds, so the
API answers 503 + Retry-After.  There is never a fallback key.  Nothing is
cached that would stop a request from working once Vault is back: every call
goes to Vault again over a pooled session, so service resumes without a restart.

Limitation, by design of transit: RSA decryption is OAEP with SHA-256 only
(transit has no hash parameter on ``decrypt``), so a vault deployment accepts
``RSA-OAEP-256`` JWEs and refuses ``RSA-OAEP`` (SHA-1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.backends.base import BackendPlugin, Capabilities, GeneratedKey
from keyd.config import Secret, Settings, Table, VaultBackendSettings, require_secret
from keyd.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    KeyNotFound,
    Unsupported,
)
from keyd.model import ALLOWED_KEY_SIZES, OaepHash, Purpose, SignScheme

T = TypeVar("T")


# Transit's own name rule (framework.GenericNameRegex).  Checking it here means
# a hostile ref ("../../sys/seal") is never spliced into a request path.
# Names the transit key that marks which keyd store owns the prefix's keys.
STORE_MARKER = "store-"
_SAFE_NAME = re.compile(r"^\w([\w.-]*\w)?$", re.ASCII)
_SAFE_MOUNT = re.compile(r"^\w[\w-]*(/\w[\w-]*)*$", re.ASCII)
_SCHEMES = {SignScheme.PSS_SHA256: "pss", SignScheme.PKCS1V15_SHA256: "pkcs1v15"}
_APPROLE_MOUNT = "approle"
# Transit decrypts RSA-OAEP with SHA-256 only; an exportable transit key can be read back.
CAPABILITIES = Capabilities(
    oaep_hashes=frozenset({OaepHash.SHA256}), exports_private_keys=True, name="vault"
)
# An AppRole token closer than this to its end is replaced by a fresh login.
_MIN_TTL_AFTER_RENEW = 120


_CREDENTIAL = re.compile(rb"^[\x21-\x7e]+$")  # printable ASCII: it travels in an HTTP header


def _credential(secret: Secret, what: str) -> str:
    """The secret as the str hvac sends; a ConfigError naming where it came from
    (never its value) when it could not be a Vault credential."""
    value = secret.reveal()
    if not _CREDENTIAL.match(value):
        raise ConfigError(
            f"[backend.vault] the {what} from {secret.source} is not a Vault {what}: "
            "it must be printable ASCII without spaces"
        )
    return value.decode("ascii")


def _shape(value: Any) -> str:
    """What Vault sent where keyd expected something else: an object's member
    names, a scalar's value, only the type of a string or list (which may be a
    token or a private key)."""
    if isinstance(value, dict):
        members = ", ".join(repr(str(k)[:40]) for k in list(value)[:8])
        return f"an object with {members}" if members else "an empty object"
    if isinstance(value, requests.Response):
        kind = value.headers.get("Content-Type", "no Content-Type")
        return f"a non-JSON body (HTTP {value.status_code}, {kind[:60]})"
    if value is None or isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r:.40}"
    return f"a {type(value).__name__} of length {len(value)}" if isinstance(
        value, str | list) else type(value).__name__


class VaultBackend:
    """keyd's Backend protocol over transit, through hvac.

    Thread-safe: one hvac client over one pooled ``requests.Session`` serves
    every API thread (hvac keeps no per-request state on the client; the token
    is read per request).  Re-login is serialised by a lock and done once even
    when many threads see the same revoked token.
    """

    def __init__(
        self, settings: VaultBackendSettings, *, approle_mount: str = _APPROLE_MOUNT
    ) -> None:
        check_settings(settings)
        self._settings = settings
        self._addr = settings.addr.rstrip("/")
        self._approle_mount = approle_mount
        self.capabilities = CAPABILITIES
        session = requests.Session()
        # No retries inside requests: an outage must surface within `timeout`,
        # and the API's Retry-After tells callers when to come back.
        pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=32, max_retries=0)
        session.mount("http://", pool)
        session.mount("https://", pool)
        self._session = session
        self._client = hvac.Client(
            url=self._addr,
            timeout=settings.timeout,
            session=session,
            namespace=settings.namespace or None,
        )
        self._login_lock = threading.Lock()
        self._public: dict[str, tuple[int, rsa.RSAPublicKey]] = {}
        if settings.auth == "token":
            self._client.token = _credential(self._read_token(), "token")

    # ------------------------------------------------------------------ auth

    def _read_token(self) -> Secret:
        return require_secret(self._settings.token_file, "VAULT_TOKEN", "vault-token",
                              missing="[backend.vault] no token", key="token_file")

    def _read_secret_id(self) -> Secret:
        return require_secret(self._settings.secret_id_file, "VAULT_SECRET_ID", "vault-secret-id",
                              missing="[backend.vault] no AppRole secret id", key="secret_id_file")

    def _login(self, stale: str | None) -> None:
        """AppRole login, unless another thread already replaced ``stale``."""
        with self._login_lock:
            if self._client.token and self._client.token != stale:
                return
            # Read the secret id again each time: an operator may have rotated it.
            secret_id = _credential(self._read_secret_id(), "AppRole secret id")
            try:
                answer = self._client.auth.approle.login(
                    role_id=self._settings.role_id,
                    secret_id=secret_id,
                    use_token=False,
                    mount_point=self._approle_mount,
                )
            except hvac.exceptions.VaultError as e:
                raise self._outage("AppRole login", e) from e
            except requests.RequestException as e:
                raise self._unreachable(e) from e
            self._client.token = self._field(answer, "AppRole login", "auth.client_token", str)

    def renew(self) -> None:
        """Renew our token (the scheduler calls this); AppRole logs in again on failure."""
        if self._settings.auth == "token":
            try:
                info = self._call("token lookup", lambda c: c.auth.token.lookup_self())
                if self._field(info, "token lookup", "data", dict).get("renewable"):
                    self._call("token renewal", lambda c: c.auth.token.renew_self())
            except hvac.exceptions.VaultError as e:
                raise self._outage("token renewal", e) from e
            return  # a non-renewable token (e.g. a root token) has nothing to renew
        stale = self._client.token
        try:
            answer = self._client.auth.token.renew_self()
            if int(answer["auth"]["lease_duration"]) >= _MIN_TTL_AFTER_RENEW:
                return
        except (hvac.exceptions.VaultError, requests.RequestException, KeyError, TypeError,
                ValueError):
            pass  # renewal failed or the token is near its max TTL: log in afresh
        self._login(stale=stale)

    # --------------------------------------------------------------- calling

    def _unreachable(self, e: requests.RequestException) -> BackendUnavailable:
        if isinstance(e, requests.Timeout):
            return BackendUnavailable(
                f"vault: no answer from {self._addr} within {self._settings.timeout:g} s",
                retry_after=2,
            )
        return BackendUnavailable(
            f"vault: unreachable at {self._addr} ({type(e).__name__})", retry_after=2
        )

    def _outage(self, what: str, e: hvac.exceptions.VaultError) -> BackendError:
        errors = "; ".join(str(x).strip() for x in (e.errors or [])) or type(e).__name__
        if isinstance(e, hvac.exceptions.VaultDown | hvac.exceptions.VaultNotInitialized):
            if "sealed" in errors.lower():
                return BackendUnavailable(f"vault: sealed at {self._addr}", retry_after=5)
            return BackendUnavailable(f"vault: unavailable at {self._addr}: {errors}")
        if isinstance(e, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            return BackendUnavailable(
                f"vault: permission denied at {self._addr} for {what} "
                "(token revoked or expired, or the policy lacks this path)",
                retry_after=5,
            )
        if isinstance(e, hvac.exceptions.RateLimitExceeded):
            return BackendUnavailable(f"vault: rate limited at {self._addr}", retry_after=1)
        if isinstance(
            e,
            hvac.exceptions.InternalServerError
            | hvac.exceptions.BadGateway
            | hvac.exceptions.UnexpectedError,
        ):
            return BackendUnavailable(f"vault: {what} failed at {self._addr}: {errors}")
        return BackendError(f"vault: {what} refused: {errors}")

    def _call(self, what: str, op: Callable[[Any], T]) -> T:
        """Run ``op`` on the client, mapping outages; AppRole re-logs in once on a 403.

        Other Vault refusals (404, 400, 500) propagate as hvac errors for the
        caller to map to KeyNotFound / DecryptionFailed; every public method
        ends in :meth:`_refused`, so none escapes the module.
        """
        for attempt in (1, 2):
            if self._settings.auth == "approle" and not self._client.token:
                self._login(stale=None)
            token = self._client.token
            try:
                return op(self._client)
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as e:
                if self._settings.auth == "approle" and attempt == 1:
                    self._login(stale=token)
                    continue
                raise self._outage(what, e) from e
            except (
                hvac.exceptions.VaultDown,
                hvac.exceptions.VaultNotInitialized,
                hvac.exceptions.RateLimitExceeded,
                hvac.exceptions.BadGateway,
            ) as e:
                raise self._outage(what, e) from e
            except requests.RequestException as e:
                raise self._unreachable(e) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _field(self, answer: Any, what: str, path: str, kind: type[T]) -> T:
        """``answer[a][b]...`` for ``path`` "a.b", of type ``kind``; a BackendError
        naming what Vault sent instead (a proxy's HTML page, a changed API)."""
        value = answer
        for depth, step in enumerate(path.split(".")):
            if not isinstance(value, dict) or step not in value:
                where = ".".join(path.split(".")[:depth]) or "the answer"
                raise BackendError(f"vault: malformed {what} answer from {self._addr}: "
                                   f"expected {path}, but {where} is {_shape(value)}")
            value = value[step]
        if not isinstance(value, kind):
            raise BackendError(f"vault: malformed {what} answer from {self._addr}: "
                               f"{path} is {_shape(value)}, not {kind.__name__}")
        return value

    def _refused(self, what: str, ref: str, e: hvac.exceptions.VaultError) -> BackendError:
        """A Vault refusal of an operation on one key, as a keyd error."""
        errors = " ".join(str(x) for x in (e.errors or [])).lower()
        # Transit words "no such key" differently per path; 404 or either phrase.
        if isinstance(e, hvac.exceptions.InvalidPath) or any(
            phrase in errors for phrase in ("not found", "no existing key")
        ):
            return KeyNotFound(f"vault: no key {ref!r} in mount {self._settings.mount!r}")
        return self._outage(what, e)

    def _name(self, ref: str) -> str:
        if not _SAFE_NAME.match(ref):
            raise KeyNotFound(f"vault: {ref!r} is not a transit key name")
        return ref

    # --------------------------------------------------------------- protocol

    def check(self) -> None:
        try:
            health = self._client.sys.read_health_status(
                method="GET", standby_ok=True, sealed_code=200, uninit_code=200
            )
        except requests.RequestException as e:
            raise self._unreachable(e) from e
        except hvac.exceptions.VaultError as e:
            raise self._outage("health check", e) from e
        if not isinstance(health, dict):
            raise BackendUnavailable(
                f"vault: unexpected health answer from {self._addr}: {_shape(health)}")
        if not health.get("initialized", False):
            raise BackendUnavailable(f"vault: not initialised at {self._addr}")
        if health.get("sealed", True):
            raise BackendUnavailable(f"vault: sealed at {self._addr}", retry_after=5)
        try:
            self._call("token lookup", lambda c: c.auth.token.lookup_self())
        except hvac.exceptions.VaultError as e:
            raise self._outage("token lookup", e) from e

    def generate(self, purpose: Purpose, size: int, *, exportable: bool = False) -> GeneratedKey:
        if size not in ALLOWED_KEY_SIZES:
            raise BackendError(f"vault: RSA key size {size} is not one of {ALLOWED_KEY_SIZES}")
        if exportable and purpose is not Purpose.TRANSPORT:
            # Signing and encryption keys never leave transit (SPEC "Backends").
            raise BackendError(f"vault: a {purpose.value} key is never exportable")
        ref = f"{self._settings.key_prefix}{purpose.value}-{secrets.token_hex(8)}"
        try:
            self._call(
                "key creation",
                lambda c: c.secrets.transit.create_key(
                    ref,
                    key_type=f"rsa-{size}",
                    exportable=exportable,
                    allow_plaintext_backup=False,
                    mount_point=self._settings.mount,
                ),
            )
        except hvac.exceptions.VaultError as e:
            raise self._refused("key creation", ref, e) from e
        return GeneratedKey(ref=ref, public_key=self.public_key(ref))

    def _latest(self, ref: str) -> tuple[int, rsa.RSAPublicKey]:
        """The key's latest version and its public key (cached: both are immutable)."""
        if (hit := self._public.get(ref)) is not None:
            return hit
        name = self._name(ref)
        try:
            answer = self._call(
                "key read",
                lambda c: c.secrets.transit.read_key(name, mount_point=self._settings.mount),
            )
        except hvac.exceptions.VaultError as e:
            raise self._refused("key read", ref, e) from e
        version = self._field(answer, "key read", "data.latest_version", int)
        pem = self._field(answer, "key read", f"data.keys.{version}.public_key", str)
        try:
            public = serialization.load_pem_public_key(pem.encode())
        except ValueError as e:
            raise BackendError(f"vault: key {ref!r} has no RSA public key") from e
        if not isinstance(public, rsa.RSAPublicKey):
            raise BackendError(f"vault: key {ref!r} is not an RSA key")
        self._public[ref] = (version, public)
        return version, public

    def public_key(self, ref: str) -> rsa.RSAPublicKey:
        return self._latest(ref)[1]

    def sign(self, ref: str, data: bytes, scheme: SignScheme) -> bytes:
        if scheme not in _SCHEMES:
            raise Unsupported(f"vault: transit has no signature scheme {scheme.value!r}")
        name = self._name(ref)
        # Send the SHA-256 digest (prehashed) so a large payload costs a small
        # request; transit signs the digest exactly as it would the message.
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        extra = {"salt_length": "hash"} if scheme is SignScheme.PSS_SHA256 else {}
        try:
            answer = self._call(
                "sign",
                lambda c: c.secrets.transit.sign_data(
                    name,
                    hash_input=digest,
                    hash_algorithm="sha2-256",
                    prehashed=True,
                    signature_algorithm=_SCHEMES[scheme],
                    mount_point=self._settings.mount,
                    # JWS PS256 needs a 32-byte salt; transit's default ("auto")
                    # makes it as long as possible, which strict verifiers refuse.
                    **extra,
                ),
            )
        except hvac.exceptions.VaultError as e:
            raise self._refused("sign", ref, e) from e
        signature = self._field(answer, "sign", "data.signature", str)
        try:
            return base64.b64decode(signature.split(":", 2)[2], validate=True)
        except (IndexError, binascii.Error) as e:
            raise BackendError(f"vault: malformed signature for key {ref!r}: "
                               f"{signature[:24]!r}... is not vault:v<n>:<base64>") from e

    def decrypt(self, ref: str, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        if oaep_hash not in self.capabilities.oaep_hashes:
            raise Unsupported(
                f"vault: transit decrypts RSA-OAEP with SHA-256 only; {oaep_hash.jwe_alg} "
                "(OAEP with SHA-1) cannot be decrypted by a vault backend: "
                "encrypt to this key with RSA-OAEP-256"
            )
        version, _ = self._latest(ref)
        wrapped = f"vault:v{version}:{base64.b64encode(ciphertext).decode()}"
        try:
            answer = self._call(
                "decrypt",
                lambda c: c.secrets.transit.decrypt_data(
                    ref, ciphertext=wrapped, mount_point=self._settings.mount
                ),
            )
        except hvac.exceptions.InvalidPath as e:
            raise self._refused("decrypt", ref, e) from e
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InternalServerError) as e:
            # Transit answers 400/500 for every bad ciphertext; one error for
            # all of them, so there is no oracle (THREATS "tampering").
            errors = " ".join(str(x) for x in (e.errors or []))
            if "key not found" in errors:
                raise self._refused("decrypt", ref, e) from e
            if isinstance(e, hvac.exceptions.InternalServerError) and "decrypt" not in errors:
                raise self._outage("decrypt", e) from e  # Vault itself is failing
            raise DecryptionFailed() from e
        except hvac.exceptions.VaultError as e:
            raise self._refused("decrypt", ref, e) from e
        plaintext = self._field(answer, "decrypt", "data.plaintext", str)
        try:
            return base64.b64decode(plaintext, validate=True)
        except binascii.Error as e:
            # Never the value: it is (a broken copy of) a content key.
            raise BackendError(f"vault: malformed plaintext for key {ref!r}: not base64") from e

    def export_private_key_pem(self, ref: str) -> bytes:
        name = self._name(ref)
        try:
            answer = self._call(
                "export",
                lambda c: c.secrets.transit.export_key(
                    name, key_type="encryption-key", mount_point=self._settings.mount
                ),
            )
        except hvac.exceptions.InvalidRequest as e:
            if "not exportable" in " ".join(str(x) for x in (e.errors or [])):
                raise BackendError(f"vault: key {ref!r} is not exportable") from e
            raise self._refused("export", ref, e) from e
        except hvac.exceptions.VaultError as e:
            raise self._refused("export", ref, e) from e
        versions = self._field(answer, "export", "data.keys", dict)
        try:
            pem = versions[max(versions, key=int)].encode()
            private = serialization.load_pem_private_key(pem, None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BackendError(f"vault: key {ref!r} exported no usable private key") from e
        # Transit exports PKCS#1; the protocol promises PKCS#8.
        return private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def destroy(self, ref: str) -> None:
        if not _SAFE_NAME.match(ref):
            return  # no such transit key can exist: nothing to destroy
        self._public.pop(ref, None)
        mount = self._settings.mount
        try:
            # Deletion is allowed only now, at destroy time, and for this key alone.
            self._call(
                "destroy",
                lambda c: c.secrets.transit.update_key_configuration(
                    ref, deletion_allowed=True, mount_point=mount
                ),
            )
            self._call(
                "destroy", lambda c: c.secrets.transit.delete_key(ref, mount_point=mount)
            )
        except hvac.exceptions.VaultError as e:
            error = self._refused("destroy", ref, e)
            if not isinstance(error, KeyNotFound):
                raise error from e  # idempotent: an absent key is already destroyed

    def _marker_prefix(self) -> str:
        return f"{self._settings.key_prefix}{STORE_MARKER}"

    def claim_store(self, store_id: str) -> None:
        """The owner's mark is a tiny transit key, ``<key_prefix>store-<store id>``
        (transit alone, under the policy's ``keyd-*``); it is never listed as a
        key, so recovery never erases it.  A mount+prefix whose keys predate the
        mark is claimed by the first store that starts."""
        ours = f"{self._marker_prefix()}{store_id}"
        if not _SAFE_NAME.match(ours):
            raise BackendError(f"vault: store id {store_id!r} makes no transit key name")
        owners = self._owners()
        if ours not in owners:
            if not owners:
                try:
                    self._call("store mark", lambda c: c.secrets.transit.create_key(
                        ours, key_type="aes256-gcm96", exportable=False,
                        allow_plaintext_backup=False, mount_point=self._settings.mount))
                except hvac.exceptions.VaultError as e:
                    raise self._refused("store mark", ours, e) from e
                owners = self._owners()  # two stores marking at once: both see both
        others = sorted(n.removeprefix(self._marker_prefix()) for n in owners if n != ours)
        if others:
            where = f"vault mount {self._settings.mount!r} key_prefix {self._settings.key_prefix!r}"
            raise ConfigError(
                f"{where} holds the keys of store {', '.join(others)}, but this replica's "
                f"store is {store_id}: refusing to start (give each store its own key_prefix)")

    def _owners(self) -> list[str]:
        marker = self._marker_prefix()
        return [n for n in self._names() if n.startswith(marker)]

    def _names(self) -> list[str]:
        try:
            answer = self._call(
                "key listing",
                lambda c: c.secrets.transit.list_keys(mount_point=self._settings.mount),
            )
        except hvac.exceptions.InvalidPath:
            return []  # transit answers 404 for a mount without keys
        except hvac.exceptions.VaultError as e:
            raise self._outage("key listing", e) from e
        if isinstance(answer, requests.Response) and answer.status_code == 204:
            return []  # no content: nothing listed
        names = self._field(answer, "key listing", "data.keys", list)
        prefix = self._settings.key_prefix
        return sorted(n for n in names if isinstance(n, str) and n.startswith(prefix))

    def list_refs(self) -> list[str]:
        marker = self._marker_prefix()
        return [n for n in self._names() if not n.startswith(marker)]

    def close(self) -> None:
        self._session.close()


# --------------------------------------------------------------------------- plugin


def from_settings(settings: Settings) -> VaultBackend:
    vault = settings.backend.options_as(VaultBackendSettings)
    return VaultBackend(vault, approle_mount=vault.approle_mount)


def read_settings(t: Table, base: Path, data_dir: Path) -> VaultBackendSettings:
    """``[backend.vault]``; the address falls back to $VAULT_ADDR, then the local dev server."""
    settings = VaultBackendSettings(
        addr=t.text("addr", "") or os.environ.get("VAULT_ADDR", "http://127.0.0.1:8200"),
        mount=t.text("mount", "transit"),
        key_prefix=t.text("key_prefix", "keyd-"),
        namespace=t.text("namespace", ""),
        auth=t.text("auth", "token"),
        token_file=t.optional_path("token_file", base),
        role_id=t.text("role_id", ""),
        secret_id_file=t.optional_path("secret_id_file", base),
        timeout=float(t.integer("timeout", 2)),
        approle_mount=t.text("approle_mount", _APPROLE_MOUNT),
    )
    t.done()
    check_settings(settings)
    return settings


def check_settings(settings: VaultBackendSettings) -> None:
    """Refuse what cannot work, at config load and again when a backend is built
    from settings made elsewhere: a mount or prefix that is not a transit name
    would be spliced into request paths."""
    if settings.auth not in ("token", "approle"):
        raise ConfigError(f"[backend.vault] auth: {settings.auth!r} is not token or approle")
    if not _SAFE_MOUNT.match(settings.mount):
        raise ConfigError(f"[backend.vault] mount: {settings.mount!r} is not a mount path")
    if settings.key_prefix and not _SAFE_NAME.match(settings.key_prefix + "x"):
        raise ConfigError(
            f"[backend.vault] key_prefix: {settings.key_prefix!r} may hold only "
            "letters, digits, '_', '-' and '.'"
        )
    if settings.auth == "approle" and not settings.role_id:
        raise ConfigError("[backend.vault] role_id is required when auth = \"approle\"")


def identity(settings: Settings) -> str:
    """The mount and key prefix (and namespace) that hold this deployment's keys."""
    v = settings.backend.options_as(VaultBackendSettings)
    namespace = f" namespace {v.namespace!r}" if v.namespace else ""
    return f"vault mount {v.mount!r} key_prefix {v.key_prefix!r}{namespace}"


PLUGIN = BackendPlugin(
    capabilities=CAPABILITIES,
    read_settings=read_settings,
    build=from_settings,
    identity=identity,
)
