"""Logging for keyd: JSON lines in production, readable lines in a terminal,
and a redaction step that every line passes through.

keyd handles bearer tokens, signed tokens, private keys, the master key, the
Vault token, AppRole secret ids and the HSM PIN.  None of them may reach a
log line, whichever way a careless call site hands it over: as a %-argument,
inside an f-string, in ``extra=``, or in an exception's message that ends up
in a traceback.  So redaction is not a filter on ``msg`` alone: it runs over
the finished text of every part of the record (message, extras, exception,
stack) inside the formatter, the last step before bytes leave the process.

Patterns are deliberately greedy toward secrets: a wrongly masked value
costs a reader a moment, a leaked one costs a key.  They never match a kid
(a 43-character thumbprint with no ``master``/``token`` cue before it), so
logs stay useful for following a key through its life.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from keyd.model import PRIVATE_JWK_MEMBERS

REDACTED = "[REDACTED]"

_B64URL = r"[A-Za-z0-9_-]"

# Key names whose values are secrets wherever they appear (extras, dicts,
# key=value text).  Matched on the whole name or its last _/- part.
_SECRET_NAMES = ("token", "secret", "secret_id", "secret-id", "password", "passwd",
                 "pin", "private_key", "master_key", "api_key", "client_secret",
                 "authorization", "x-vault-token")

_Replacer = str | Callable[[re.Match[str]], str]


def _keep_prefix(m: re.Match[str]) -> str:
    return m.group(1) + REDACTED


def _jwk_member(m: re.Match[str]) -> str:
    q, name, vq = m.group("q"), m.group("name"), m.group("vq")
    return f"{q}{name}{q}{m.group('sep')}{vq}{REDACTED}{vq}"


_PATTERNS: list[tuple[re.Pattern[str], _Replacer]] = [
    # PEM private keys (PKCS#1, PKCS#8, encrypted PKCS#8, EC, OpenSSH): the
    # whole block, or everything base64-looking after BEGIN when the END was
    # cut off.  \\n covers a PEM shown through repr() of bytes.
    (re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----"
                r"(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY-----|(?:[A-Za-z0-9+/=\s]|\\n)*)",
                re.DOTALL), REDACTED),
    # Compact JWS / JWT / JWE (3 or 5 segments; a detached JWS has an empty
    # middle).  A JSON object header always base64url-encodes to "ey...".
    (re.compile(rf"(?<![A-Za-z0-9])ey{_B64URL}{{8,}}(?:\.{_B64URL}*){{2,4}}"), REDACTED),
    # `Authorization: Bearer …` / `Basic …`, in any casing.
    (re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"), _keep_prefix),
    # keyd's own client tokens: "keyd_" + token_urlsafe(32).  The lookahead
    # (an upper-case letter or digit somewhere) spares metric names such as
    # keyd_certificate_not_after_timestamp_seconds.
    (re.compile(rf"(?<![A-Za-z0-9])keyd_(?={_B64URL}*[A-Z0-9]){_B64URL}{{32,}}"), REDACTED),
    # Vault / OpenBao tokens: hvs./hvb./hvr. (Vault ≥1.10) and s./b./r.
    # (legacy Vault, OpenBao).
    (re.compile(rf"(?<![A-Za-z0-9._-])(?:hv[sbr]|[sbr])\.{_B64URL}{{24,}}"), REDACTED),
    # The master key: 32 bytes base64(url), after "master", "master key",
    # "KEYD_MASTER_KEY=" and the like.
    (re.compile(r"(?i)(master(?:[_ -]?key)?\W{1,5})[A-Za-z0-9_+/-]{43}=?"), _keep_prefix),
    # AppRole secret ids are UUIDs; catch them after "secret_id"/"secret-id"
    # with any separator, not only "=" or ":".
    (re.compile(r"(?i)(secret[_ -]?id\W{1,5})[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-"
                r"[0-9a-f]{4}-[0-9a-f]{12}"), _keep_prefix),
    # JWK private members in JSON or a Python repr: "d": "…", 'qi': '…'.
    (re.compile(r"(?P<q>[\"'])(?P<name>d|p|q|dp|dq|qi|k)(?P=q)(?P<sep>\s*:\s*)"
                r"(?P<vq>[\"'])[^\"']*(?P=vq)"), _jwk_member),
    (re.compile(r"(?P<q>[\"'])oth(?P=q)\s*:\s*\[[^\]]*\]"),
     lambda m: f"{m.group('q')}oth{m.group('q')}: {REDACTED}"),
    # key=value / key: value / "key": "value" where the key names a secret
    # (token, password, pin, secret_id, X-Vault-Token, ...).
    (re.compile(r"(?i)(?<![A-Za-z0-9])(?P<key>(?:[A-Za-z0-9]+[_-])*(?:"
                + "|".join(re.escape(n) for n in _SECRET_NAMES)
                + r")[\"']?\s*[:=]\s*)"
                # Already masked, or a Bearer/Basic scheme the pattern above
                # masked while keeping the scheme visible: leave alone.
                r"(?!\[REDACTED\]|(?:bearer|basic)\s)(?:(?P<vq>[\"'])(?:(?!(?P=vq)).)*(?P=vq)|[^\s,;}\])]+)"),
     lambda m: f"{m.group('key')}{m.group('vq') or ''}{REDACTED}{m.group('vq') or ''}"),
]


def redact(text: str) -> str:
    """``text`` with every secret keyd knows the shape of replaced by [REDACTED]."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return (lowered in PRIVATE_JWK_MEMBERS or lowered in _SECRET_NAMES
            or re.split(r"[_-]", lowered)[-1] in _SECRET_NAMES
            or lowered.endswith(("secret_id", "secret-id", "private_key")))


def redact_value(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with secrets masked, by name and by shape."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): REDACTED if _secret_name(str(k)) else redact_value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact(repr(bytes(value)))
    return redact(str(value))


# Attributes every LogRecord has; anything else came in through `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message: noise in JSON
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: (REDACTED if _secret_name(k) else redact_value(v))
            for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def _message(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not lose the line
        text = f"{record.msg!s} {record.args!r}"
    return redact(text)


def _exception(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    # Formatted fresh here and never cached on the record: the cache
    # (record.exc_text) is shared with any other handler.
    parts = []
    if record.exc_info and record.exc_info[0] is not None:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return redact("\n".join(parts))


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in _extras(record).items():
            line[f"extra_{key}" if key in line else key] = value
        if exc := _exception(self, record):
            line["exc"] = exc
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2025-01-01T00:00:00.000Z INFO keyd.server: message key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        # The message and extras are one line each: a caller-supplied "\n"
        # must not forge a second log line.  Tracebacks keep their lines.
        extras = "".join(f" {k}={_escape(json.dumps(v, ensure_ascii=False, default=str))}"
                         for k, v in _extras(record).items())
        line = (f"{_timestamp(record)} {record.levelname} {record.name}: "
                f"{_escape(_message(record))}{extras}")
        if exc := _exception(self, record):
            line += "\n" + exc
        return line


def _escape(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class RedactingHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def wants_json(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """JSON unless a person is reading: ``$KEYD_LOG_FORMAT`` decides, else a TTY means text."""
    choice = (os.environ if environ is None else environ).get("KEYD_LOG_FORMAT", "").lower()
    if choice in ("json", "text"):
        return choice == "json"
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: production default
        return True


def setup_logging(*, json_format: bool | None = None, level: int = logging.INFO,
                  stream: IO[str] | None = None) -> None:
    """Route every logger through one redacting handler on ``stream`` (stderr).

    ``json_format`` None decides by :func:`wants_json`: JSON under systemd
    (journald) or any pipe, text at a terminal, ``$KEYD_LOG_FORMAT`` wins.
    """
    stream = sys.stderr if stream is None else stream
    if json_format is None:
        json_format = wants_json(stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RedactingHandler)]:
        root.removeHandler(old)
        old.close()
    handler = RedactingHandler(stream)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that log on their own loggers must go through ours: uvicorn
    # (log_config=None leaves them propagating) and anything else that set
    # up a handler of its own before us.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
