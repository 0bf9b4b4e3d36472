"""EME-OAEP decoding (RFC 8017 §7.1.2 step 3) for the ``raw`` decryption path.

Why this exists: SoftHSM2 2.6.1 (and some real HSMs) offer ``CKM_RSA_PKCS_OAEP``
with SHA-1 only.  For RSA-OAEP-256 keyd can instead ask the token for the raw
RSA private-key operation (``CKM_RSA_X_509``) and remove the OAEP padding here.

Why that is acceptable:
- the private key never leaves the token: the token still does the one
  operation that needs it, m = c^d mod n;
- what comes back is the encoded message EM, which is the padded content
  encryption key of a JWE; keyd would receive that CEK from the token anyway
  (that is what decryption is for), and the padding around it is public
  structure plus a random seed, not key material;
- only the padding check moves to the host, and it is written to be no oracle:
  Manger's attack needs to tell "the first byte of EM is not zero" apart from
  the other failures.  Here every check runs on every input, the results are
  folded together without early exits or branches on secret data, and every
  failure raises the same :class:`DecryptionFailed` with the same message.

Python cannot promise constant time the way C can; "constant-time-ish" is the
honest word.  The remaining timing differences come from the interpreter, not
from which check failed, and the token's own RSA operation dominates the time.
"""

from __future__ import annotations

import hashlib
import hmac

from keyd.errors import DecryptionFailed
from keyd.model import OaepHash

_NAMES = {OaepHash.SHA256: "sha256", OaepHash.SHA1: "sha1"}


def _digest(oaep_hash: OaepHash, data: bytes) -> bytes:
    return hashlib.new(_NAMES[oaep_hash], data).digest()


def mgf1(seed: bytes, length: int, oaep_hash: OaepHash) -> bytes:
    """MGF1 (RFC 8017 Appendix B.2.1) with the same digest as the OAEP hash."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += _digest(oaep_hash, seed + counter.to_bytes(4, "big"))
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _is_zero(byte: int) -> int:
    """1 if ``byte`` (0..255) is 0, else 0, without a branch."""
    return ((byte - 1) >> 8) & 1


def oaep_decode(em: bytes, k: int, oaep_hash: OaepHash, label: bytes = b"") -> bytes:
    """The message M inside the k-byte encoded message EM, or DecryptionFailed.

    ``em`` is the output of the raw RSA operation, left-padded to ``k`` bytes
    (the modulus length) by the caller.
    """
    l_hash = _digest(oaep_hash, label)
    h_len = len(l_hash)
    if len(em) != k or k < 2 * h_len + 2:
        # Depends only on public lengths, never on the decrypted value.
        raise DecryptionFailed()

    y = em[0]
    masked_seed = em[1 : 1 + h_len]
    masked_db = em[1 + h_len :]
    seed = _xor(masked_seed, mgf1(masked_db, h_len, oaep_hash))
    db = _xor(masked_db, mgf1(seed, k - h_len - 1, oaep_hash))

    # Fold every check into `bad` (0 good, 1 bad); scan the whole of DB.
    bad = 1 - _is_zero(y)
    bad |= 0 if hmac.compare_digest(db[:h_len], l_hash) else 1
    rest = db[h_len:]
    found = 0  # 1 once the 0x01 separator has been seen
    index = 0  # position of the separator in `rest`
    for i, byte in enumerate(rest):
        is_one = _is_zero(byte ^ 0x01)
        is_zero = _is_zero(byte)
        first_one = is_one & (1 - found)
        index |= i & -first_one
        # Before the separator only zero bytes (PS) are allowed.
        bad |= (1 - found) & (1 - is_zero) & (1 - is_one)
        found |= is_one
    bad |= 1 - found
    if bad:
        raise DecryptionFailed()
    return rest[index + 1 :]
