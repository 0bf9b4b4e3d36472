"""PayNet's Data Provider universal link: the consent id and its signature."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from keyd.errors import BadRequest
from keyd.jose.compact import show

MAX_URL_CHARS = 16 * 1024
MAX_CONSENT_ID_CHARS = 256


@dataclass(frozen=True)
class UniversalLink:
    consent_id: str
    signature: str  # a compact JWS by the issuer over consent_id's bytes
    redirect_uri: str | None  # None when the link carries none


def universal_link_consent(url: str) -> tuple[str, str]:
    """``(consent_id, signature)`` of a universal link (see parse_universal_link)."""
    link = parse_universal_link(url)
    return link.consent_id, link.signature


def parse_universal_link(url: str) -> UniversalLink:
    """The parts of
    ``https://<dp domain>/ofm/my/authorize/ais?consent_id=…&signature=…&redirect_uri=…``.

    The caller then verifies ``signature`` (a compact JWS by PayNet) and checks
    its payload is exactly ``consent_id.encode()``.  Repeated parameters are
    refused: with two ``consent_id`` values, which one was signed is ambiguous.
    """
    if not isinstance(url, str) or not url:
        raise BadRequest("the universal link must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(
            f"the universal link is {len(url)} characters; the limit is {MAX_URL_CHARS}"
        )
    try:
        parts = urlsplit(url)
        params = parse_qsl(
            parts.query, keep_blank_values=True, strict_parsing=True, max_num_fields=32
        )
        host = parts.hostname
    except ValueError as e:
        raise BadRequest(f"the universal link is not a valid URL: {show(str(e), 120)}") from e
    if parts.scheme != "https" or not host:
        raise BadRequest(f"the universal link must be an https URL, not {show(url)}")
    found: dict[str, list[str]] = {"consent_id": [], "signature": [], "redirect_uri": []}
    for name, value in params:
        if name in found:
            found[name].append(value)
    for name, values in found.items():
        if name == "redirect_uri" and not values:
            continue  # optional; checked against the issuer's allow-list when it has one
        if len(values) != 1 or not values[0]:
            raise BadRequest(
                f"the universal link needs exactly one non-empty {name}, found {len(values)}"
            )
    consent_id, signature = found["consent_id"][0], found["signature"][0]
    if len(consent_id) > MAX_CONSENT_ID_CHARS or not consent_id.isprintable():
        raise BadRequest(f"consent_id {show(consent_id)} is not a printable id")
    redirect = found["redirect_uri"]
    return UniversalLink(consent_id, signature, redirect[0] if redirect else None)
