"""Decrypting JWE addressed to us, with the RSA key held in a backend.

Only RSA-OAEP(-256) key management and four content encryptions are
accepted; everything else is refused from the header alone, before any RSA
operation or KDF runs (a PBES2 ``p2c`` of 10**9 is never iterated).

No oracle: once the header is accepted, every way the rest can be wrong
(an encrypted key that does not unwrap, a CEK of the wrong length, a bad IV,
a short or flipped tag, an edited header) ends in the same
``DecryptionFailed()`` at the same step.  When the key unwrap fails we carry
on with a random CEK (RFC 7516 11.5) so the failure surfaces only at the tag.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyd.errors import DecryptionFailed, InvalidToken, KeydError
from keyd.jose.compact import b64u_decode, decode_header, header_kid, show, split_compact
from keyd.model import OaepHash

CekDecrypter = Callable[[bytes, OaepHash], bytes]

KEY_MANAGEMENT = OaepHash.by_jwe_alg()


@dataclass(frozen=True)
class _Enc:
    cek_bytes: int
    iv_bytes: int
    tag_bytes: int
    gcm: bool
    mac: str = ""  # HMAC digest for CBC-HS


CONTENT_ENCRYPTION = {
    "A128GCM": _Enc(16, 12, 16, gcm=True),
    "A256GCM": _Enc(32, 12, 16, gcm=True),
    "A128CBC-HS256": _Enc(32, 16, 16, gcm=False, mac="sha256"),
    "A256CBC-HS512": _Enc(64, 16, 32, gcm=False, mac="sha512"),
}
# Header members that change how a JWE is processed and that keyd does not do.
_REFUSED_MEMBERS = ("zip", "crit", "jku", "x5u", "jwk", "x5c")


@dataclass(frozen=True)
class JweResult:
    plaintext: bytes
    kid: str  # the header's kid; "" when the sender named none
    header: dict[str, Any]


def parse_jwe_header(compact: str) -> dict[str, Any]:
    """The protected header, checked against the allow-lists; no RSA work yet,
    so the service can pick the key by ``kid`` first."""
    segments = split_compact(compact, 5, "JWE")
    header = decode_header(segments[0], "JWE")
    alg, enc = header.get("alg"), header.get("enc")
    if not isinstance(alg, str) or alg not in KEY_MANAGEMENT:
        raise InvalidToken(f"JWE alg {show(alg)} is refused; accepted: {sorted(KEY_MANAGEMENT)}")
    if not isinstance(enc, str) or enc not in CONTENT_ENCRYPTION:
        raise InvalidToken(
            f"JWE enc {show(enc)} is refused; accepted: {sorted(CONTENT_ENCRYPTION)}"
        )
    for name in _REFUSED_MEMBERS:
        if name in header:
            # zip: decompression bombs and compression oracles; crit: nothing
            # keyd would understand; jku & co.: keys never come from a token.
            raise InvalidToken(f"JWE header {name!r} is refused")
    if "kid" in header:  # optional: without one the service uses its active encryption key
        header_kid(header, "JWE")
    if not segments[1]:
        raise InvalidToken("the JWE has no encrypted key")
    return header


def _unwrap(encrypted_key: str, oaep: OaepHash, decrypt_cek: CekDecrypter, size: int) -> bytes:
    """The CEK, or a random one of the right size when anything is wrong."""
    try:
        cek = decrypt_cek(b64u_decode(encrypted_key, DecryptionFailed, "encrypted key"), oaep)
    except DecryptionFailed:
        cek = b""
    except KeydError:
        raise  # an outage (503) or an unknown key is not a property of the token
    if len(cek) != size:
        cek = os.urandom(size)
    return cek


def _segment(text: str) -> bytes:
    return b64u_decode(text, DecryptionFailed, "JWE segment")


def _decrypt_gcm(cek: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    return AESGCM(cek).decrypt(iv, ciphertext + tag, aad)


def _decrypt_cbc_hs(
    spec: _Enc, cek: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes
) -> bytes:
    """RFC 7518 5.2.2.2: MAC first (constant-time compare), decrypt only if it matches."""
    half = spec.cek_bytes // 2
    mac_key, enc_key = cek[:half], cek[half:]
    al = (len(aad) * 8).to_bytes(8, "big")
    full = hmac.new(mac_key, aad + iv + ciphertext + al, getattr(hashlib, spec.mac)).digest()
    if not hmac.compare_digest(full[: spec.tag_bytes], tag):
        raise DecryptionFailed()
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def decrypt_jwe(compact: str, decrypt_cek: CekDecrypter) -> JweResult:
    header = parse_jwe_header(compact)
    h_seg, k_seg, iv_seg, c_seg, t_seg = compact.split(".")
    spec = CONTENT_ENCRYPTION[header["enc"]]
    cek = _unwrap(k_seg, KEY_MANAGEMENT[header["alg"]], decrypt_cek, spec.cek_bytes)
    try:
        iv, ciphertext, tag = _segment(iv_seg), _segment(c_seg), _segment(t_seg)
        if len(iv) != spec.iv_bytes or len(tag) != spec.tag_bytes:
            raise DecryptionFailed()
        aad = h_seg.encode("ascii")  # RFC 7516 5.2 step 14: ASCII(BASE64URL(header))
        if spec.gcm:
            plaintext = _decrypt_gcm(cek, iv, ciphertext, tag, aad)
        else:
            if len(ciphertext) == 0 or len(ciphertext) % 16:
                raise DecryptionFailed()
            plaintext = _decrypt_cbc_hs(spec, cek, iv, ciphertext, tag, aad)
    except (InvalidTag, ValueError, DecryptionFailed) as e:
        # The one answer for every tampering case: same class, same detail.
        raise DecryptionFailed() from e
    return JweResult(plaintext=plaintext, kid=header.get("kid", ""), header=header)
