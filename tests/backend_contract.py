"""The contract every key backend passes (keyd/backends/base.py).

A backend's own test module subclasses :class:`BackendContract` and provides
only a ``backend`` fixture; everything below runs against it unchanged.  What
is expected follows from the backend's ``Capabilities``: what it declares must
work, and what it leaves out must fail with the one :class:`Unsupported`
error (a 422), decided before any key or ciphertext is looked at.
Signatures and decryptions are checked with pyca/cryptography's public-key
operations, independently of the backend that made them.
"""

from __future__ import annotations

import json
import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyd.api.errors import keyd_error
from keyd.backends.base import Backend, GeneratedKey
from keyd.errors import BackendError, DecryptionFailed, KeyNotFound, Unsupported
from keyd.model import OaepHash, Purpose, SignScheme

_HASHES = {OaepHash.SHA256: hashes.SHA256, OaepHash.SHA1: hashes.SHA1}


def strict_pss_verify(public_key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> None:
    """JWS PS256 as RFC 7518 requires it: the salt must be exactly 32 bytes."""
    public_key.verify(
        signature,
        data,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def oaep_encrypt(public_key: rsa.RSAPublicKey, plaintext: bytes, oaep_hash: OaepHash) -> bytes:
    h = _HASHES[oaep_hash]
    return public_key.encrypt(
        plaintext, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)
    )


class BackendContract:
    """Subclass and provide a ``backend`` fixture yielding a ready Backend."""

    @pytest.fixture
    def signing_key(self, backend: Backend) -> GeneratedKey:
        return backend.generate(Purpose.SIGNING, 2048)

    @pytest.fixture
    def encryption_key(self, backend: Backend) -> GeneratedKey:
        return backend.generate(Purpose.ENCRYPTION, 2048)

    def test_is_a_backend_and_checks_out(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        backend.check()
        assert backend.capabilities.name

    def test_declares_rsa_oaep_256_which_the_jwks_advertises(self, backend: Backend) -> None:
        """The published encryption key says RSA-OAEP-256: every backend must decrypt it."""
        assert OaepHash.SHA256 in backend.capabilities.oaep_hashes

    def test_generated_key_has_the_requested_size(self, backend: Backend) -> None:
        key = backend.generate(Purpose.SIGNING, 3072)
        assert key.public_key.key_size == 3072
        assert key.public_key.public_numbers().e == 65537

    def test_public_key_is_found_again_by_ref(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        again = backend.public_key(signing_key.ref)
        assert again.public_numbers() == signing_key.public_key.public_numbers()

    def test_two_keys_are_different(self, backend: Backend, signing_key: GeneratedKey) -> None:
        other = backend.generate(Purpose.SIGNING, 2048)
        assert other.ref != signing_key.ref
        assert other.public_key.public_numbers() != signing_key.public_key.public_numbers()

    def test_pss_signature_has_a_32_byte_salt(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        data = b"eyJhbGciOiJQUzI1NiJ9.eyJzdWIiOiJrZXlkIn0"
        signature = backend.sign(signing_key.ref, data, SignScheme.PSS_SHA256)
        strict_pss_verify(signing_key.public_key, signature, data)
        with pytest.raises(InvalidSignature):
            strict_pss_verify(signing_key.public_key, signature, data + b"x")

    def test_pss_signatures_are_randomised(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        a = backend.sign(signing_key.ref, b"same", SignScheme.PSS_SHA256)
        b = backend.sign(signing_key.ref, b"same", SignScheme.PSS_SHA256)
        assert a != b

    def test_pkcs1v15_signature_verifies(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        data = os.urandom(300)
        signature = backend.sign(signing_key.ref, data, SignScheme.PKCS1V15_SHA256)
        signing_key.public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())

    def test_large_messages_sign(self, backend: Backend, signing_key: GeneratedKey) -> None:
        data = os.urandom(200_000)
        signature = backend.sign(signing_key.ref, data, SignScheme.PSS_SHA256)
        strict_pss_verify(signing_key.public_key, signature, data)

    @pytest.mark.parametrize("oaep_hash", list(OaepHash))
    def test_oaep_decrypts_a_content_key_with_each_declared_hash(
        self, backend: Backend, encryption_key: GeneratedKey, oaep_hash: OaepHash
    ) -> None:
        cek = os.urandom(32)
        ciphertext = oaep_encrypt(encryption_key.public_key, cek, oaep_hash)
        if oaep_hash in backend.capabilities.oaep_hashes:
            assert backend.decrypt(encryption_key.ref, ciphertext, oaep_hash) == cek
            return
        with pytest.raises(Unsupported, match=oaep_hash.jwe_alg) as raised:
            backend.decrypt(encryption_key.ref, ciphertext, oaep_hash)
        # What the API would answer: the sender's error, not keyd failing.
        answer = keyd_error(raised.value)
        assert answer.status_code == 422
        assert json.loads(bytes(answer.body))["error"] == "unsupported"

    @pytest.mark.parametrize("oaep_hash", list(OaepHash))
    def test_an_undeclared_hash_is_unsupported_whatever_the_ciphertext(
        self, backend: Backend, encryption_key: GeneratedKey, oaep_hash: OaepHash
    ) -> None:
        """Decided from the hash alone: garbage and an unknown ref get the same answer."""
        if oaep_hash in backend.capabilities.oaep_hashes:
            with pytest.raises(DecryptionFailed):
                backend.decrypt(encryption_key.ref, b"\x00" * 256, oaep_hash)
            return
        for ref, ciphertext in ((encryption_key.ref, b"\x00" * 256),
                                (encryption_key.ref, b""), ("no-such-key", os.urandom(256))):
            with pytest.raises(Unsupported):
                backend.decrypt(ref, ciphertext, oaep_hash)

    def test_bad_ciphertext_is_decryption_failed(
        self, backend: Backend, encryption_key: GeneratedKey
    ) -> None:
        for oaep_hash in backend.capabilities.oaep_hashes:
            good = oaep_encrypt(encryption_key.public_key, os.urandom(32), oaep_hash)
            flipped = bytes([good[0] ^ 1]) + good[1:]
            for bad in (flipped, os.urandom(256), b"\x00" * 256, b"", good[:-1]):
                with pytest.raises(DecryptionFailed):
                    backend.decrypt(encryption_key.ref, bad, oaep_hash)

    def test_wrong_oaep_hash_is_decryption_failed(
        self, backend: Backend, encryption_key: GeneratedKey
    ) -> None:
        ciphertext = oaep_encrypt(encryption_key.public_key, os.urandom(32), OaepHash.SHA1)
        with pytest.raises(DecryptionFailed):
            backend.decrypt(encryption_key.ref, ciphertext, OaepHash.SHA256)

    def test_unknown_ref_is_key_not_found(self, backend: Backend) -> None:
        for ref in ("no-such-key", "../../etc/passwd"):
            with pytest.raises(KeyNotFound):
                backend.sign(ref, b"x", SignScheme.PSS_SHA256)
            with pytest.raises(KeyNotFound):
                backend.public_key(ref)

    def test_destroy_makes_the_key_unusable_and_is_idempotent(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        assert signing_key.ref in backend.list_refs()
        backend.destroy(signing_key.ref)
        assert signing_key.ref not in backend.list_refs()
        with pytest.raises(KeyNotFound):
            backend.sign(signing_key.ref, b"x", SignScheme.PSS_SHA256)
        backend.destroy(signing_key.ref)

    def test_signing_key_is_not_exportable(
        self, backend: Backend, signing_key: GeneratedKey
    ) -> None:
        with pytest.raises(BackendError) as raised:
            backend.export_private_key_pem(signing_key.ref)
        if backend.capabilities.exports_private_keys:
            # A refusal for this key, not a missing capability.
            assert not isinstance(raised.value, Unsupported)
        else:
            assert isinstance(raised.value, Unsupported)

    def test_exportable_transport_key_exports_when_capable(self, backend: Backend) -> None:
        if not backend.capabilities.exports_private_keys:
            with pytest.raises(Unsupported):
                backend.generate(Purpose.TRANSPORT, 2048, exportable=True)
            return
        key = backend.generate(Purpose.TRANSPORT, 2048, exportable=True)
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        private = load_pem_private_key(backend.export_private_key_pem(key.ref), None)
        assert isinstance(private, rsa.RSAPrivateKey)
        assert private.public_key().public_numbers() == key.public_key.public_numbers()
