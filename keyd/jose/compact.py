"""Strict decoding of JOSE compact serialisations: base64url and headers.

Everything an attacker controls passes through here first, so the rules are
narrow on purpose: base64url without padding and in canonical form only,
UTF-8 JSON objects only, no duplicate member names (jwcrypto and Python's
``json`` silently keep the last one, which lets ``{"alg":"none","alg":"PS256"}``
mean different things to different parsers), no NaN/Infinity, bounded size
and nesting.  No foreign exception leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from keyd.errors import BadRequest, InvalidToken, KeydError, PayloadTooLarge

MAX_HEADER_BYTES = 8 * 1024  # a decoded protected header
MAX_TOKEN_CHARS = 1024 * 1024  # a whole compact token
MAX_NESTING = 16  # JSON depth inside a header; real headers are 1-2 deep
MAX_CONTENT_NESTING = 64  # request bodies, payloads and plaintexts
MAX_KID_CHARS = 256

_B64U = re.compile(r"[A-Za-z0-9_-]*")


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str, error: type[KeydError] = BadRequest, what: str = "value") -> bytes:
    """Strict base64url: alphabet ``A-Z a-z 0-9 - _`` only, no padding, canonical.

    Canonical means the unused low bits of the last character are zero, so one
    byte string has exactly one encoding (a flipped bit in a tag cannot hide
    in bits the decoder would drop).
    """
    if not isinstance(text, str):
        raise error(f"{what} must be a base64url string, not {type(text).__name__}")
    if not _B64U.fullmatch(text):
        raise error(f"{what} is not base64url without padding")
    if len(text) % 4 == 1:
        raise error(f"{what} is not valid base64url: {len(text)} characters is an "
                    "impossible length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise error(f"{what} is not base64url: {e}") from e
    if b64u_encode(data) != text:
        raise error(f"{what} is not canonical base64url")
    return data


def show(value: object, limit: int = 64) -> str:
    """A bounded repr for error details: hostile values may be 10 KB or hold NULs."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise _Duplicate(name)
        obj[name] = value
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # "1e999" is valid JSON grammar but Python reads it as inf, which no JSON
    # encoder can write back (Starlette's JSONResponse raises on it).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


class _LoneSurrogate(ValueError):
    pass


def _check_tree(value: Any, limit: int, level: int = 1) -> int:
    """The nesting depth of ``value``; raises _LoneSurrogate on an unpaired
    surrogate in any string (``"\ud800"`` decodes to one, and it cannot be
    encoded as UTF-8 again: an answer holding it would fail to serialise)."""
    if level > limit:
        return level
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise _LoneSurrogate()
        return level
    if isinstance(value, dict):
        deepest = level
        for name, item in value.items():
            _check_tree(name, limit, level)
            deepest = max(deepest, _check_tree(item, limit, level + 1))
        return deepest
    if isinstance(value, list):
        return max((_check_tree(v, limit, level + 1) for v in value), default=level)
    return level


def _cheap_depth(text: str, limit: int = MAX_NESTING) -> int:
    """Bracket depth ignoring strings: refuses deep nesting before json recurses."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def strict_json(
    data: bytes,
    what: str,
    error: type[KeydError] = InvalidToken,
    *,
    depth: int = MAX_NESTING,
    too_deep: type[KeydError] | None = None,
) -> Any:
    """The one strict JSON reader, for tokens, JWKS documents and request bodies.

    UTF-8 only; no duplicate member names; no NaN, Infinity or numbers that
    overflow to them (``1e999``); no lone surrogates; at most ``depth`` levels
    of nesting.  Whatever it returns can be written back as JSON unchanged.
    """
    if not isinstance(data, bytes):
        raise error(f"{what} must be bytes, not {type(data).__name__}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8") from e
    if _cheap_depth(text, depth) > depth:
        raise (too_deep or error)(f"{what} is nested deeper than {depth} levels")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_refuse_constant, parse_float=_finite_float)
        nested = _check_tree(value, depth) > depth
    except _Duplicate as e:
        raise error(f"{what} has the member {show(str(e))} twice") from e
    except _LoneSurrogate as e:
        raise error(f"{what} holds a lone surrogate (\\ud800-\\udfff)") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {show(str(e), 120)}") from e
    if nested:
        raise (too_deep or error)(f"{what} is nested deeper than {depth} levels")
    return value


def read_content(data: bytes, what: str) -> tuple[Any, str | None]:
    """Content keyd hands back (a payload, a plaintext): ``(value, None)`` when
    ``data`` is strict JSON, else ``(None, why not)``; never raises on content."""
    try:
        return strict_json(data, what, InvalidToken, depth=MAX_CONTENT_NESTING), None
    except InvalidToken as e:
        return None, e.detail


def json_object_content(
    data: bytes, what: str, error: type[KeydError] = InvalidToken
) -> dict[str, Any] | None:
    """The claims in ``data`` when it is a JSON object; None when it is not
    one (a consent id, a JWE, text).  Bytes that start like an object must be
    strict JSON, else ``error``: a lenient reader elsewhere might find claims
    in ``{"exp":1,"exp":9e9}`` that we never checked (or never signed off on).
    """
    head = data.lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):  # a BOM: some readers skip it
        head = head[3:].lstrip(b" \t\r\n")
    if not head.startswith(b"{"):
        return None
    value = strict_json(data, what, error, depth=MAX_CONTENT_NESTING)
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


def split_compact(token: object, parts: int, what: str) -> list[str]:
    """Split a compact token into exactly ``parts`` segments, refusing oversize input."""
    if not isinstance(token, str):
        raise InvalidToken(f"a {what} must be a string, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS:
        raise PayloadTooLarge(
            f"the {what} is {len(token)} characters; the limit is {MAX_TOKEN_CHARS}"
        )
    if not token.isascii():
        raise InvalidToken(f"the {what} holds non-ASCII characters")
    if token.lstrip().startswith("{"):
        raise InvalidToken(f"the {what} is a JSON serialisation; only the compact form is accepted")
    segments = token.split(".")
    if len(segments) != parts:
        hint = " (a JWE where a JWS is expected?)" if what == "JWS" and len(segments) == 5 else ""
        raise InvalidToken(f"a compact {what} has {parts} segments, not {len(segments)}{hint}")
    return segments


def decode_header(segment: str, what: str) -> dict[str, Any]:
    """The protected header: bounded, strict base64url, a JSON object, no duplicates."""
    if len(segment) > (MAX_HEADER_BYTES * 4 + 2) // 3:
        raise PayloadTooLarge(f"the {what} header is over {MAX_HEADER_BYTES} bytes")
    if not segment:
        raise InvalidToken(f"the {what} header is empty")
    raw = b64u_decode(segment, InvalidToken, f"the {what} header")
    header = strict_json(raw, f"the {what} header")
    if not isinstance(header, dict):
        raise InvalidToken(f"the {what} header is a JSON {type(header).__name__}, not an object")
    return header


def header_kid(header: dict[str, Any], what: str) -> str:
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken(f"the {what} header needs a kid string, not {show(kid)}")
    if len(kid) > MAX_KID_CHARS:
        raise InvalidToken(f"the {what} kid is {len(kid)} characters; the limit is {MAX_KID_CHARS}")
    return kid
