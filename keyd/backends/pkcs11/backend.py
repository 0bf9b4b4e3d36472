"""The ``pkcs11`` backend: keys generated on an HSM token, used through python-pkcs11.

Keys are RSA pairs made on the token with ``CKA_SENSITIVE=true`` and
``CKA_EXTRACTABLE=false``; a key is named by its random 16-byte ``CKA_ID``
(ref ``pkcs11:<hex id>``) and labelled ``keyd-<purpose>-<hex id>``.  A key
found on the token that is extractable or not sensitive is refused.

Decryption and the ``oaep_sha256`` setting
------------------------------------------
RSA-OAEP-256 needs ``CKM_RSA_PKCS_OAEP`` with SHA-256.  Tokens list that
mechanism without saying which digests they accept (SoftHSM2 2.6.1 lists it
and answers CKR_ARGUMENTS_BAD for SHA-256), so at start-up keyd makes a real
trial decryption with a throwaway session key.  Then, by ``oaep_sha256``:

- ``token``: the token's mechanism, or refuse to start;
- ``raw``: ``CKM_RSA_X_509`` on the token and the OAEP padding checked in keyd
  (see :mod:`keyd.backends.pkcs11.oaep` for why that is acceptable);
- ``auto`` (default): ``token`` when the trial works, else ``raw``, said in a
  warning at start-up and kept in ``oaep_sha256_mode`` (no silent downgrade).

RSA-OAEP (SHA-1) uses the token's mechanism (SoftHSM2 has it), or ``raw`` on
the same terms when the token lacks ``CKM_RSA_PKCS_OAEP`` altogether.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from keyd.backends.base import BackendPlugin, Capabilities, GeneratedKey
from keyd.backends.pkcs11.oaep import oaep_decode
from keyd.backends.pkcs11.token import (
    LOST_SESSION_ERRORS,
    Pooled,
    SessionLost,
    SessionPool,
    find_token,
    load_module,
    logged_in,
    session_usable,
)
from keyd.config import Pkcs11BackendSettings, Settings, Table, require_secret
from keyd.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    KeydError,
    KeyNotFound,
    Unsupported,
)
from keyd.model import ALLOWED_KEY_SIZES, MIN_RSA_BITS, OaepHash, Purpose, SignScheme

log = logging.getLogger("keyd.backends.pkcs11")

T = TypeVar("T")
_REF = re.compile(r"^pkcs11:([0-9a-f]{32})$")
_LABEL_PREFIX = "keyd-"
NOT_EXPORTABLE = "pkcs11: keys on an HSM are never exportable"

_SIGN_MECHANISMS: dict[SignScheme, tuple[Mechanism, Any]] = {
    # JWS PS256: MGF1-SHA256 and a 32-byte salt (RFC 7518 §3.5).
    SignScheme.PSS_SHA256: (Mechanism.SHA256_RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32)),
    SignScheme.PKCS1V15_SHA256: (Mechanism.SHA256_RSA_PKCS, None),
}
_OAEP_PARAMS = {
    OaepHash.SHA256: (Mechanism.SHA256, MGF.SHA256, None),
    OaepHash.SHA1: (Mechanism.SHA_1, MGF.SHA1, None),
}
_CAPABILITIES = {
    Purpose.SIGNING: MechanismFlag.SIGN | MechanismFlag.VERIFY,
    Purpose.TRANSPORT: MechanismFlag.SIGN | MechanismFlag.VERIFY,
    # The encryption key signs too, but only its own certificate or CSR: a
    # self-signed certificate and a CSR's proof of possession both need the
    # subject key's signature.  The API never signs a JWS with it (keyd picks
    # the signing key by purpose), so it decrypts JWEs and nothing else.
    Purpose.ENCRYPTION: MechanismFlag.DECRYPT | MechanismFlag.ENCRYPT | MechanismFlag.SIGN
    | MechanismFlag.VERIFY,
}

# The trial decryption's answer per (module, slot): a token's mechanisms do not
# change while the process runs, and the trial costs a key generation.
_probes: dict[tuple[str, int], str | None] = {}


# What config may count on before a token is opened: keys never leave it, and
# one process drives it (the token is the bottleneck, bench/sign_pkcs11.py).
# The OAEP digests are narrowed to what the token offers once it is probed.
CAPABILITIES = Capabilities(
    oaep_hashes=frozenset({OaepHash.SHA256, OaepHash.SHA1}),
    exports_private_keys=False,
    name="pkcs11",
    one_process=True,
)


def from_settings(settings: Settings) -> Pkcs11Backend:
    return Pkcs11Backend(settings.backend.options_as(Pkcs11BackendSettings))


def _ref_id(ref: str) -> bytes:
    m = _REF.match(ref)
    if not m:
        raise KeyNotFound(f"pkcs11: {ref[:80]!r} is not a pkcs11 key reference")
    return bytes.fromhex(m.group(1))


def _to_public_key(modulus: bytes, exponent: bytes) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(
        int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
    ).public_key()


class Pkcs11Backend:
    """Keys on a PKCS#11 token; opens its sessions, logs in and probes at construction."""

    def __init__(self, cfg: Pkcs11BackendSettings) -> None:
        check_settings(cfg)
        # In the order an operator fixes things: the library, the token, the PIN.
        lib = load_module(cfg.module)
        self._token = find_token(lib, cfg.module, cfg.token_label, cfg.token_serial)
        if cfg.pin_file is not None and not cfg.pin_file.is_file():
            raise ConfigError(f"[backend.pkcs11] pin_file: {cfg.pin_file} not found")
        pin = require_secret(cfg.pin_file, "KEYD_PKCS11_PIN", "pkcs11-pin",
                             missing="pkcs11: no PIN", key="[backend.pkcs11] pin_file")
        self._cfg = cfg
        self.label = self._token.label
        self._probe_key = (str(cfg.module.resolve()), self._token.slot.slot_id)
        self._pool = SessionPool(self._token, self._probe_key, pin, cfg.sessions)
        self._epoch = 0  # bumped by destroy(): cached key objects may be stale
        self._public: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()
        # Log in and probe now: a wrong PIN or a missing mechanism must stop
        # start-up, not the first sign.
        first = self._pool.take()  # an empty slot: sessions open lazily
        try:
            first = self._pool.fresh()
            self.oaep_sha256_mode, sha1_mode = self._choose_decryption(first)
        except p11.PKCS11Error as e:
            self._pool.give_back(first)
            self._pool.close()
            # Anything the token answers here that keyd did not name above
            # still stops start-up as one line (the CLI's "error", not a bug).
            raise BackendUnavailable(
                f"pkcs11: token {self.label!r} failed at start-up: {type(e).__name__} {e}"
            ) from e
        except BaseException:
            self._pool.give_back(first)
            self._pool.close()
            raise
        self._pool.give_back(first)
        self._oaep_modes = {OaepHash.SHA256: self.oaep_sha256_mode, OaepHash.SHA1: sha1_mode}
        self.capabilities = replace(
            CAPABILITIES,
            oaep_hashes=frozenset(h for h, mode in self._oaep_modes.items() if mode),
        )

    # ------------------------------------------------------------------ start-up

    def _choose_decryption(self, pooled: Pooled) -> tuple[str, str]:
        """(mode for SHA-256, mode for SHA-1), each "token" or "raw"; or ConfigError."""
        try:
            mechanisms = self._token.slot.get_mechanisms()
        except p11.PKCS11Error as e:
            raise BackendUnavailable(f"pkcs11: cannot list the mechanisms: {e!r}") from e
        has_oaep = Mechanism.RSA_PKCS_OAEP in mechanisms
        has_raw = Mechanism.RSA_X_509 in mechanisms
        for needed in (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256_RSA_PKCS):
            if needed not in mechanisms:
                raise ConfigError(f"pkcs11: token {self.label!r} lacks CKM_{needed.name}")
        wanted = self._cfg.oaep_sha256
        failure = (
            self._trial_oaep_sha256(pooled) if has_oaep else "does not offer CKM_RSA_PKCS_OAEP"
        )
        if wanted == "token" and failure:
            raise ConfigError(
                f"pkcs11: [backend.pkcs11] oaep_sha256 = \"token\", but token {self.label!r} "
                f"cannot decrypt RSA-OAEP-256: it {failure}; set oaep_sha256 = \"raw\" (or "
                "\"auto\") to decrypt with CKM_RSA_X_509 on the token and check the OAEP "
                "padding in keyd"
            )
        if wanted == "raw" or failure:
            if not has_raw:
                raise ConfigError(
                    f"pkcs11: token {self.label!r} can do RSA-OAEP-256 neither with "
                    f"CKM_RSA_PKCS_OAEP (it {failure or 'was told not to'}) nor with CKM_RSA_X_509"
                )
            sha256_mode = "raw"
            if wanted == "auto":
                log.warning(
                    "pkcs11: token %r %s; RSA-OAEP-256 will use CKM_RSA_X_509 on the token "
                    "with the OAEP padding checked in keyd (oaep_sha256 = \"raw\"). Set "
                    "[backend.pkcs11] oaep_sha256 to \"raw\" to say so, or \"token\" to refuse",
                    self.label, failure,
                )
            else:
                log.info("pkcs11: RSA-OAEP-256 uses CKM_RSA_X_509 (oaep_sha256 = \"raw\")")
        else:
            sha256_mode = "token"
            log.info("pkcs11: RSA-OAEP-256 uses the token's CKM_RSA_PKCS_OAEP with SHA-256")
        sha1_mode = "token" if has_oaep else ("raw" if has_raw and wanted != "token" else "")
        return sha256_mode, sha1_mode

    def _trial_oaep_sha256(self, pooled: Pooled) -> str | None:
        """None when the token really decrypts RSA-OAEP-256, else what it answered."""
        if self._probe_key in _probes:
            return _probes[self._probe_key]
        session = pooled.session
        private: Any
        try:
            public, private = session.generate_keypair(
                KeyType.RSA, MIN_RSA_BITS, store=False,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
        except p11.PKCS11Error as e:
            raise BackendUnavailable(f"pkcs11: cannot make the trial key: {e!r}") from e
        try:
            key = _to_public_key(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
            secret = os.urandom(32)
            sha = hashes.SHA256()
            ciphertext = key.encrypt(secret, padding.OAEP(padding.MGF1(sha), sha, None))
            try:
                out = private.decrypt(
                    ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=_OAEP_PARAMS[OaepHash.SHA256],
                )
                answer = None if out == secret else "returns a wrong plaintext for SHA-256"
            except p11.PKCS11Error as e:
                answer = (f"answers {type(e).__name__} to a trial CKM_RSA_PKCS_OAEP "
                          "decryption with SHA-256")
        finally:
            private.destroy()
            public.destroy()
        _probes[self._probe_key] = answer
        return answer

    def check(self) -> None:
        self._run(lambda p: p.session.generate_random(64))

    # ------------------------------------------------------------------ sessions

    def _run(self, op: Callable[[Pooled], T]) -> T:
        """Run ``op`` on a borrowed session; a lost session is retried once on a fresh one."""
        pooled = self._pool.take()
        try:
            for attempt in (1, 2):
                try:
                    if pooled is None:
                        pooled = self._pool.fresh()
                    return op(pooled)
                except KeydError:
                    raise
                except p11.PKCS11Error as e:
                    lost = isinstance(e, LOST_SESSION_ERRORS + (SessionLost,)) or (
                        pooled is not None and not session_usable(pooled.session)
                    )
                    if not lost:
                        raise BackendError(
                            f"pkcs11: token {self.label!r}: {type(e).__name__} {e}"
                        ) from e
                    if pooled is not None:
                        self._pool.discard(pooled)
                        pooled = None
                    if attempt == 2:
                        raise BackendUnavailable(
                            f"pkcs11: token {self.label!r} lost the session twice "
                            f"({type(e).__name__})"
                        ) from e
                    log.warning(
                        "pkcs11: session lost (%s); retrying once on a fresh session",
                        type(e).__name__,
                    )
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._pool.give_back(pooled)

    def _key(self, pooled: Pooled, key_id: bytes, cls: ObjectClass) -> Any:
        """The key object with ``key_id``, cached per session; private keys are vetted."""
        if pooled.epoch != self._epoch:
            pooled.keys.clear()
            pooled.epoch = self._epoch
        cached = pooled.keys.get((key_id, cls))
        if cached is not None:
            return cached
        ref = "pkcs11:" + key_id.hex()
        try:
            key = pooled.session.get_key(object_class=cls, key_type=KeyType.RSA, id=key_id)
        except p11.NoSuchKey:
            # A logged-out session sees no private objects: that is an outage,
            # not a missing key.
            if cls is ObjectClass.PRIVATE_KEY and not logged_in(pooled.session):
                raise SessionLost() from None
            raise KeyNotFound(f"pkcs11: no key {ref} on token {self.label!r}") from None
        except p11.MultipleObjectsReturned as e:
            raise BackendError(f"pkcs11: several objects with CKA_ID of {ref}") from e
        if cls is ObjectClass.PRIVATE_KEY:
            sensitive, extractable = (key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE])
            if not sensitive or extractable:
                raise BackendError(
                    f"pkcs11: key {ref} ({key.label!r}) on token {self.label!r} is "
                    f"{'extractable' if extractable else 'not sensitive'}; keyd refuses HSM "
                    "keys that could leave the token"
                )
        pooled.keys[(key_id, cls)] = key
        return key

    # ------------------------------------------------------------------ keys

    def generate(self, purpose: Purpose, size: int, *, exportable: bool = False) -> GeneratedKey:
        if exportable:
            raise Unsupported(NOT_EXPORTABLE)
        if size not in ALLOWED_KEY_SIZES:
            raise BackendError(f"pkcs11: key size {size} is not one of {ALLOWED_KEY_SIZES}")
        key_id = os.urandom(16)
        label = f"{_LABEL_PREFIX}{purpose.value}-{key_id.hex()}"
        capabilities = _CAPABILITIES[purpose]

        def make(pooled: Pooled) -> rsa.RSAPublicKey:
            public, _ = pooled.session.generate_keypair(
                KeyType.RSA, size, id=key_id, label=label, store=True,
                capabilities=capabilities,
                public_template={Attribute.PRIVATE: False},
                private_template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
            return _to_public_key(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])

        public_key = self._run(make)
        ref = "pkcs11:" + key_id.hex()
        self._public[ref] = public_key
        log.info("pkcs11: generated %s on token %r", label, self.label)
        return GeneratedKey(ref=ref, public_key=public_key)

    def public_key(self, ref: str) -> rsa.RSAPublicKey:
        if (cached := self._public.get(ref)) is not None:
            return cached
        key_id = _ref_id(ref)

        def read(pooled: Pooled) -> rsa.RSAPublicKey:
            self._key(pooled, key_id, ObjectClass.PRIVATE_KEY)  # exists and is vetted
            public = self._key(pooled, key_id, ObjectClass.PUBLIC_KEY)
            return _to_public_key(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])

        public_key = self._run(read)
        self._public[ref] = public_key
        return public_key

    def sign(self, ref: str, data: bytes, scheme: SignScheme) -> bytes:
        if scheme not in _SIGN_MECHANISMS:
            raise Unsupported(f"pkcs11: no mechanism for signature scheme {scheme.value!r}")
        key_id = _ref_id(ref)
        mechanism, param = _SIGN_MECHANISMS[scheme]

        def sign(pooled: Pooled) -> bytes:
            key = self._key(pooled, key_id, ObjectClass.PRIVATE_KEY)
            if not hasattr(key, "sign"):
                # python-pkcs11 gives a key without CKA_SIGN no sign() at all.
                raise BackendError(f"pkcs11: key {ref} on token {self.label!r} has CKA_SIGN false")
            signature: bytes = key.sign(data, mechanism=mechanism, mechanism_param=param)
            return signature

        return self._run(sign)

    def decrypt(self, ref: str, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        mode = self._oaep_modes.get(oaep_hash)
        if not mode:
            raise Unsupported(f"pkcs11: token {self.label!r} cannot decrypt {oaep_hash.jwe_alg}")
        k = (self.public_key(ref).key_size + 7) // 8
        if len(ciphertext) != k:
            raise DecryptionFailed()  # RFC 8017 §7.1.2 step 1b; lengths are public
        key_id = _ref_id(ref)

        def decrypt(pooled: Pooled) -> bytes:
            key = self._key(pooled, key_id, ObjectClass.PRIVATE_KEY)
            if not hasattr(key, "decrypt"):
                raise BackendError(
                    f"pkcs11: key {ref} on token {self.label!r} has CKA_DECRYPT false"
                )
            try:
                if mode == "token":
                    out: bytes = key.decrypt(
                        ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=_OAEP_PARAMS[oaep_hash],
                    )
                    return out
                em: bytes = key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509)
            except LOST_SESSION_ERRORS:
                raise
            except p11.PKCS11Error:
                if not session_usable(pooled.session):
                    raise SessionLost() from None  # an outage, retried: not the ciphertext
                # Whatever the token says about a bad ciphertext, the caller
                # hears the one DecryptionFailed: no padding oracle.
                raise DecryptionFailed() from None
            # Some tokens strip the leading zero bytes of the raw result.
            return oaep_decode(em.rjust(k, b"\x00"), k, oaep_hash)

        return self._run(decrypt)

    def export_private_key_pem(self, ref: str) -> bytes:
        raise Unsupported(NOT_EXPORTABLE)

    def destroy(self, ref: str) -> None:
        m = _REF.match(ref)
        if not m:
            return  # not ours, so there is nothing to destroy
        key_id = bytes.fromhex(m.group(1))

        def destroy(pooled: Pooled) -> None:
            for obj in list(pooled.session.get_objects({Attribute.ID: key_id})):
                obj.destroy()

        with self._lock:
            self._epoch += 1
        self._run(destroy)
        self._public.pop(ref, None)
        log.info("pkcs11: destroyed %s on token %r", ref, self.label)

    def list_refs(self) -> list[str]:
        def collect(pooled: Pooled) -> list[str]:
            ids: set[bytes] = set()
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in pooled.session.get_objects({Attribute.CLASS: cls}):
                    label, key_id = obj[Attribute.LABEL], obj[Attribute.ID]
                    if label.startswith(_LABEL_PREFIX) and len(key_id) == 16:
                        ids.add(key_id)
            return sorted("pkcs11:" + i.hex() for i in ids)

        return self._run(collect)

    def close(self) -> None:
        self._pool.close()


# --------------------------------------------------------------------------- plugin


def read_settings(t: Table, base: Path, data_dir: Path) -> Pkcs11BackendSettings:
    """``[backend.pkcs11]``; the module path is taken as written (a system library)."""
    settings = Pkcs11BackendSettings(
        module=Path(t.text("module", "/usr/lib/softhsm/libsofthsm2.so")),
        token_label=t.text("token_label", "keyd"),
        token_serial=t.text("token_serial", ""),
        pin_file=t.optional_path("pin_file", base),
        oaep_sha256=t.text("oaep_sha256", "auto"),
        sessions=t.integer("sessions", 4),
    )
    t.done()
    check_settings(settings)
    return settings


def check_settings(cfg: Pkcs11BackendSettings) -> None:
    """Refuse what cannot work, at config load and again at construction."""
    if cfg.oaep_sha256 not in ("auto", "token", "raw"):
        raise ConfigError(
            f"[backend.pkcs11] oaep_sha256: {cfg.oaep_sha256!r} is not auto, token or raw"
        )
    if cfg.sessions < 1:
        raise ConfigError(f"[backend.pkcs11] sessions: {cfg.sessions} must be at least 1")


def identity(settings: Settings) -> str:
    """The token label that holds this deployment's keys."""
    return f"pkcs11 token {settings.backend.options_as(Pkcs11BackendSettings).token_label!r}"


PLUGIN = BackendPlugin(
    capabilities=CAPABILITIES,
    read_settings=read_settings,
    build=from_settings,
    identity=identity,
)
