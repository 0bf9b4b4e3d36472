"""The embedded ``local`` backend: RSA keys encrypted at rest in the data directory.

Each private key lives in its own file, ``<keys_dir>/<ref>.key``, as a small
JSON envelope:

- a fresh random 256-bit *data key* encrypts the key's PKCS#8 DER with
  AES-256-GCM;
- the data key is itself wrapped with AES-256-GCM under the *master key*
  (32 bytes from a 0600 file, ``$KEYD_MASTER_KEY`` or the systemd credential
  ``master-key``);
- both encryptions authenticate the same associated data: the format version,
  the ref, the purpose and the exportable flag.  A file copied over another
  ref's file, or edited to claim ``exportable: true``, fails authentication
  instead of being used.

A per-key data key means the master key only ever encrypts 32-byte random
values, and GCM's random-nonce limit is nowhere near reach.

Decrypted keys are cached in memory (the hot sign path must not re-read and
re-decrypt a file per call); ``destroy`` drops them from the cache.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyd import errors
from keyd.backends.base import BackendPlugin, Capabilities, GeneratedKey
from keyd.config import LocalBackendSettings, Settings, Table, read_secret, resolve_path
from keyd.jose.compact import b64u_decode, b64u_encode
from keyd.model import ALLOWED_KEY_SIZES, OaepHash, Purpose, SignScheme

FORMAT_VERSION = 1
MASTER_KEY_ENV = "KEYD_MASTER_KEY"
MASTER_KEY_CREDENTIAL = "master-key"

# A ref is only ever this shape.  It is checked before it goes anywhere near
# a path, so "../../etc/passwd" is an unknown key, never a file name.
_REF = re.compile(r"^local-[0-9a-f]{16}\Z")
_SUFFIX = ".key"
_NONCE = 12
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}\Z")

_OAEP_HASHES: dict[OaepHash, type[hashes.HashAlgorithm]] = {
    OaepHash.SHA256: hashes.SHA256,
    OaepHash.SHA1: hashes.SHA1,
}


@dataclass(frozen=True)
class _Key:
    private: rsa.RSAPrivateKey
    exportable: bool


def _aad(ref: str, purpose: str, exportable: bool) -> bytes:
    """The associated data both GCM layers authenticate: binds the file to its ref."""
    return json.dumps(
        {"v": FORMAT_VERSION, "ref": ref, "purpose": purpose, "exportable": exportable},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _fsync_dir(path: Path) -> None:
    """Make a create, rename or unlink in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CAPABILITIES = Capabilities(
    oaep_hashes=frozenset({OaepHash.SHA256, OaepHash.SHA1}),
    exports_private_keys=True,
    name="local",
)


class LocalBackend:
    capabilities = CAPABILITIES

    def __init__(self, keys_dir: Path, master_key: bytes, master_source: str = "") -> None:
        if len(master_key) != 32:
            raise errors.ConfigError(
                f"local backend: the master key is {len(master_key)} bytes, not 32"
            )
        self._keys_dir = keys_dir
        self._master = AESGCM(master_key)
        self._master_source = master_source or "the configuration"  # where it came from
        self._cache: dict[str, _Key] = {}
        self._lock = threading.Lock()
        try:
            keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask and ignored for an existing
            # directory: set it explicitly, nobody else has business in here.
            keys_dir.chmod(0o700)
        except OSError as e:
            raise errors.BackendUnavailable(
                f"local: keys directory {keys_dir} unusable: {e}"
            ) from e

    # ------------------------------------------------------------------ protocol

    def check(self) -> None:
        """The keys directory exists, is ours alone, is writeable, and the master key fits."""
        d = self._keys_dir
        try:
            st = d.stat()
            if not stat.S_ISDIR(st.st_mode):
                raise errors.BackendError(f"local: {d} is not a directory")
            if st.st_mode & 0o077:
                raise errors.BackendError(
                    f"local: keys directory {d} has mode {stat.S_IMODE(st.st_mode):04o}, "
                    "expected 0700"
                )
            probe = d / f".probe-{secrets.token_hex(8)}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as e:
            raise errors.BackendUnavailable(
                f"local: keys directory {d} is not writeable: {e}"
            ) from e
        # A wrong master key should fail at start-up, not on the first sign:
        # unwrapping one data key is a single cheap AES-GCM operation.
        refs = self.list_refs()
        if refs:
            try:
                self._unwrap(refs[0], self._read_envelope(refs[0]))
            except errors.BackendError:
                raise errors.BackendError(
                    f"local: wrong master key: the key from {self._master_source} does not "
                    f"open {d / refs[0]}.key. Check that it is the key `keyd init` made for "
                    f"this data_dir (a file wins over $KEYD_MASTER_KEY, which wins over the "
                    f"credential 'master-key'); if it was lost or replaced, restore the backup "
                    f"to {self._master_source} (base64url of 32 bytes, mode 0600)"
                ) from None

    def generate(self, purpose: Purpose, size: int, *, exportable: bool = False) -> GeneratedKey:
        if size not in ALLOWED_KEY_SIZES:
            raise errors.BackendError(f"local: key size {size} is not one of {ALLOWED_KEY_SIZES}")
        if exportable and not self.capabilities.exports_private_keys:
            raise errors.Unsupported("local: this backend is declared not to export keys")
        if exportable and purpose is not Purpose.TRANSPORT:
            raise errors.BackendError(f"local: a {purpose.value} key cannot be exportable")
        private = rsa.generate_private_key(public_exponent=65537, key_size=size)
        ref = f"local-{secrets.token_hex(8)}"
        self._write(ref, purpose, exportable, private)
        with self._lock:
            self._cache[ref] = _Key(private, exportable)
        return GeneratedKey(ref=ref, public_key=private.public_key())

    def public_key(self, ref: str) -> rsa.RSAPublicKey:
        return self._load(ref).private.public_key()

    def sign(self, ref: str, data: bytes, scheme: SignScheme) -> bytes:
        private = self._load(ref).private
        if scheme is SignScheme.PSS_SHA256:
            # JWS PS256 (RFC 7518 3.5) wants a salt as long as the hash: 32 bytes.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return private.sign(data, pss, hashes.SHA256())
        if scheme is SignScheme.PKCS1V15_SHA256:
            return private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        raise errors.Unsupported(f"local: signature scheme {scheme.value!r} is not supported")

    def decrypt(self, ref: str, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        h = _OAEP_HASHES.get(oaep_hash)
        if h is None or oaep_hash not in self.capabilities.oaep_hashes:
            raise errors.Unsupported(f"local: cannot decrypt {oaep_hash.jwe_alg}")
        private = self._load(ref).private
        try:
            return private.decrypt(
                ciphertext, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)
            )
        except ValueError:
            # One error for every bad ciphertext: no padding oracle.
            raise errors.DecryptionFailed() from None

    def export_private_key_pem(self, ref: str) -> bytes:
        if not self.capabilities.exports_private_keys:
            raise errors.Unsupported("local: this backend is declared not to export keys")
        key = self._load(ref)
        if not key.exportable:
            raise errors.BackendError(f"local: key {ref} is not exportable")
        return key.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def destroy(self, ref: str) -> None:
        # Overwriting before unlinking buys nothing on journaling or
        # copy-on-write file systems and SSDs; the key is encrypted anyway,
        # and without the file its data key is gone.
        if not _REF.match(ref):
            return
        with self._lock:
            self._cache.pop(ref, None)
        try:
            self._path(ref).unlink(missing_ok=True)
            _fsync_dir(self._keys_dir)
        except OSError as e:
            raise errors.BackendUnavailable(f"local: cannot remove key {ref}: {e}") from e

    def list_refs(self) -> list[str]:
        try:
            names = os.listdir(self._keys_dir)
        except OSError as e:
            raise errors.BackendUnavailable(f"local: cannot list {self._keys_dir}: {e}") from e
        refs = (n.removesuffix(_SUFFIX) for n in names if n.endswith(_SUFFIX))
        return sorted(r for r in refs if _REF.match(r))

    def close(self) -> None:
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------ storage

    def _path(self, ref: str) -> Path:
        return self._keys_dir / f"{ref}{_SUFFIX}"

    def _write(self, ref: str, purpose: Purpose, exportable: bool, key: rsa.RSAPrivateKey) -> None:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        aad = _aad(ref, purpose.value, exportable)
        data_key = AESGCM.generate_key(bit_length=256)
        key_nonce, wrap_nonce = os.urandom(_NONCE), os.urandom(_NONCE)
        envelope = {
            "v": FORMAT_VERSION,
            "ref": ref,
            "purpose": purpose.value,
            "exportable": exportable,
            "wrapped_key": b64u_encode(
                wrap_nonce + self._master.encrypt(wrap_nonce, data_key, aad)
            ),
            "private_key": b64u_encode(key_nonce + AESGCM(data_key).encrypt(key_nonce, der, aad)),
        }
        body = json.dumps(envelope, indent=1).encode() + b"\n"
        final = self._path(ref)
        tmp = self._keys_dir / f".{ref}.tmp-{secrets.token_hex(4)}"
        try:
            # O_EXCL + 0600 from the first byte: the file is never readable by others.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self._keys_dir)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise errors.BackendUnavailable(f"local: cannot write key {ref}: {e}") from e

    def _read_envelope(self, ref: str) -> dict[str, object]:
        if not _REF.match(ref):
            raise errors.KeyNotFound(f"local: no key {ref!r}")
        try:
            raw = self._path(ref).read_bytes()
        except FileNotFoundError:
            raise errors.KeyNotFound(f"local: no key {ref!r}") from None
        except OSError as e:
            raise errors.BackendUnavailable(f"local: cannot read key {ref}: {e}") from e
        try:
            envelope = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise errors.BackendError(f"local: key file for {ref} is not valid JSON") from None
        if not isinstance(envelope, dict) or envelope.get("v") != FORMAT_VERSION:
            version = envelope.get("v") if isinstance(envelope, dict) else None
            raise errors.BackendError(
                f"local: key file for {ref} has unknown format version {version!r}"
            )
        return envelope

    def _unwrap(self, ref: str, envelope: dict[str, object]) -> tuple[bytes, bytes]:
        """(data key, AAD); BackendError naming the ref on any mismatch."""
        purpose, exportable = envelope.get("purpose"), envelope.get("exportable")
        wrapped = envelope.get("wrapped_key")
        if not (
            isinstance(purpose, str) and isinstance(exportable, bool) and isinstance(wrapped, str)
        ):
            raise errors.BackendError(f"local: key file for {ref} is malformed")
        # The AAD uses the ref we were asked for, not the one written in the
        # file: a file moved to another ref's name fails here.
        aad = _aad(ref, purpose, exportable)
        try:
            blob = b64u_decode(wrapped, errors.BackendError, f"local: the wrapped key of {ref}")
            return self._master.decrypt(blob[:_NONCE], blob[_NONCE:], aad), aad
        except (InvalidTag, ValueError, binascii.Error):
            raise errors.BackendError(
                f"local: key {ref} cannot be opened: wrong master key, or the file was "
                "tampered with or moved from another ref"
            ) from None

    def _load(self, ref: str) -> _Key:
        with self._lock:
            cached = self._cache.get(ref)
        if cached is not None:
            return cached
        envelope = self._read_envelope(ref)
        data_key, aad = self._unwrap(ref, envelope)
        sealed = envelope.get("private_key")
        if not isinstance(sealed, str):
            raise errors.BackendError(f"local: key file for {ref} is malformed")
        try:
            blob = b64u_decode(sealed, errors.BackendError, f"local: the sealed key of {ref}")
            der = AESGCM(data_key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
            private = serialization.load_der_private_key(der, password=None)
        except (InvalidTag, ValueError, binascii.Error, TypeError):
            raise errors.BackendError(
                f"local: key {ref} cannot be opened: the file was tampered with"
            ) from None
        if not isinstance(private, rsa.RSAPrivateKey):
            raise errors.BackendError(f"local: key {ref} is not an RSA key")
        key = _Key(private, envelope["exportable"] is True)
        with self._lock:
            # Two threads may race to load the same key; either result is the same key.
            return self._cache.setdefault(ref, key)


# ---------------------------------------------------------------------- master key


def _decode_master_key(text: bytes, source: str) -> bytes:
    """base64url of exactly 32 bytes; errors name the source, never the value."""
    try:
        s = text.strip().decode("ascii")
    except UnicodeDecodeError:
        raise errors.ConfigError(f"master key from {source} is not base64url text") from None
    if not _B64URL.match(s):
        raise errors.ConfigError(f"master key from {source} is not base64url text") from None
    key = b64u_decode(s.rstrip("="), errors.ConfigError, f"master key from {source}")
    if len(key) != 32:
        raise errors.ConfigError(
            f"master key from {source} decodes to {len(key)} bytes; it must be exactly 32"
        )
    return key


def _read_master_key_file(path: Path) -> bytes | None:
    """The file's content, or None when absent; refuses a file others can read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise errors.ConfigError(f"master key file {path} cannot be read: {e.strerror}") from None
    try:
        # fstat the open descriptor, not the path: no window between check and read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.ConfigError(f"master key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise errors.ConfigError(
                f"master key file {path} has mode {mode:04o}; it must be 0600 or stricter "
                f"(chmod 600 {path})"
            )
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def resolve_master_key(settings: Settings) -> bytes | None:
    """The first of: the master key file, ``$KEYD_MASTER_KEY``, the credential ``master-key``."""
    found = _master_key_and_source(settings)
    return None if found is None else found[0]


def _master_key_and_source(settings: Settings) -> tuple[bytes, str] | None:
    path = _master_key_file(settings)
    content = _read_master_key_file(path)
    if content is not None:
        return _decode_master_key(content, f"file {path}"), f"file {path}"
    # The file was checked above; read_secret covers the environment and systemd.
    secret = read_secret(None, MASTER_KEY_ENV, MASTER_KEY_CREDENTIAL)
    if secret is None:
        return None
    return _decode_master_key(secret.reveal(), secret.source), secret.source


def create_master_key_file(settings: Settings) -> Path:
    """Write a fresh random master key (for ``keyd init``); never overwrites one."""
    path = _master_key_file(settings)
    try:
        for folder in {settings.keyd.data_dir, path.parent}:
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
                folder.chmod(0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise errors.ConfigError(
            f"master key file {path} already exists; refusing to overwrite it"
        ) from None
    except OSError as e:
        raise errors.ConfigError(
            f"master key file {path} cannot be created: {e.strerror}"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # the umask cannot loosen it, but may have narrowed it oddly
        os.write(fd, (b64u_encode(secrets.token_bytes(32)) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return path


def from_settings(settings: Settings) -> LocalBackend:
    found = _master_key_and_source(settings)
    if found is None:
        raise errors.ConfigError(
            "local backend: no master key: run `keyd init`, or set one of: the file "
            f"{_master_key_file(settings)} (mode 0600), ${MASTER_KEY_ENV} "
            f"(base64url of 32 bytes), the systemd credential {MASTER_KEY_CREDENTIAL!r}"
        )
    key, source = found
    return LocalBackend(settings.keyd.data_dir / "keys", key, source)


# --------------------------------------------------------------------------- plugin


def read_settings(t: Table, base: Path, data_dir: Path) -> LocalBackendSettings:
    """``[backend.local]``: the master key file, relative to the data directory."""
    settings = LocalBackendSettings(
        master_key_file=resolve_path(data_dir, t.text("master_key_file", "master.key"))
    )
    t.done()
    return settings


def _master_key_file(settings: Settings) -> Path:
    return settings.backend.options_as(LocalBackendSettings).master_key_file


def identity(settings: Settings) -> str | None:
    """The master key's fingerprint; None before `keyd init` creates it."""
    key = resolve_master_key(settings)
    if key is None:
        return None
    # A fingerprint, never the key: a domain-separated hash, cut short.
    fingerprint = hashlib.sha256(b"keyd master key fingerprint\0" + key).hexdigest()[:16]
    return f"local master key {fingerprint}"


def prepare(settings: Settings) -> list[str]:
    """`keyd init`: create the master key file unless a master key is already set."""
    if resolve_master_key(settings) is not None:
        return []
    path = create_master_key_file(settings)
    return [f"created master key {path} (0600); back it up off this host"]


PLUGIN = BackendPlugin(
    capabilities=CAPABILITIES,
    read_settings=read_settings,
    build=from_settings,
    identity=identity,
    prepare=prepare,
)
