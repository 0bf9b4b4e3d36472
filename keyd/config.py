"""config.toml, read once into frozen, typed settings.

Every error names the offending key (``[lifecycle.signing] validity``) and
the value.  Relative paths resolve against the config file's folder.  Secrets
never come from config.toml itself: only from a file, an environment variable
or a systemd credential, and they print masked.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyd.errors import ConfigError
from keyd.model import ALLOWED_KEY_SIZES, KidScheme, Mode, Purpose
from keyd.resources import default_policies_dir

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_PRODUCTION_VALIDITY = timedelta(days=365)


def one_of(values: Iterable[object], last: str = "or") -> str:
    """Values in plain words: ``2048, 3072 or 4096`` (never a Python repr of a list)."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def parse_duration(value: object, where: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"`` (``"0s"`` allowed) -> timedelta."""
    if not isinstance(value, str) or not (m := _DURATION.match(value.strip())):
        raise ConfigError(f"{where}: {value!r} is not a duration like \"90s\", \"15m\", \"7d\"")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


class Secret:
    """A secret value that never shows itself in repr, str or a log line."""

    __slots__ = ("_value", "source")

    def __init__(self, value: bytes, source: str) -> None:
        self._value = value
        self.source = source  # where it came from, safe to log

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source}, '**********')"

    __str__ = __repr__


def read_secret(file: Path | None, env: str, credential: str) -> Secret | None:
    """The first of: a file, an environment variable, a systemd credential."""
    if file is not None and file.is_file():
        return Secret(file.read_bytes().strip(), f"file {file}")
    if env and (value := os.environ.get(env)):
        return Secret(value.strip().encode(), f"${env}")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and credential and (path := Path(creds) / credential).is_file():
        return Secret(path.read_bytes().strip(), f"systemd credential {credential}")
    return None


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class KeydSettings:
    mode: Mode
    data_dir: Path
    client_id: str
    organisation: str
    kid: KidScheme
    policies_dir: Path
    publish_transport: bool
    throwaway: bool  # a test store: certificate validity under 12 months allowed
    country: str


@dataclass(frozen=True)
class PublicSettings:
    listen: Listen
    max_age: int


@dataclass(frozen=True)
class ApiSettings:
    listen: Listen | None
    socket: Path | None
    max_body: int  # bytes
    rate_limit: float  # requests a second per client (0: no limit)
    rate_burst: int  # requests a client may make at once before the rate applies
    header_timeout: timedelta  # a request's headers must arrive within this
    body_timeout: timedelta  # and its body within this
    max_header_bytes: int
    workers: int = 1  # serving processes on the same listeners ("auto": one per core)


@dataclass(frozen=True)
class StoreSettings:
    url: str


@dataclass(frozen=True)
class LocalBackendSettings:
    master_key_file: Path


@dataclass(frozen=True)
class VaultBackendSettings:
    addr: str
    mount: str
    key_prefix: str
    namespace: str
    auth: str  # "token" | "approle"
    token_file: Path | None
    role_id: str
    secret_id_file: Path | None
    timeout: float  # seconds per request; an outage answers 503 within 2 s
    approle_mount: str = "approle"  # where the AppRole auth method is mounted


@dataclass(frozen=True)
class Pkcs11BackendSettings:
    module: Path
    token_label: str
    token_serial: str
    pin_file: Path | None
    oaep_sha256: str  # "auto" | "token" | "raw": see keyd/backends/pkcs11.py
    sessions: int


@dataclass(frozen=True)
class BackendSettings:
    kind: str  # "local" | "vault" | "pkcs11"
    local: LocalBackendSettings
    vault: VaultBackendSettings
    pkcs11: Pkcs11BackendSettings


@dataclass(frozen=True)
class LifecycleSettings:
    purpose: Purpose
    enabled: bool
    key_size: int
    validity: timedelta
    rotate_after: timedelta
    prepublish: timedelta
    overlap: timedelta
    renew_before: timedelta
    exportable: bool  # transport only: the TLS terminator needs the private key
    max_published: int = 10  # a rotation that would publish more keys is refused


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    timeout: float  # seconds per attempt
    retries: int  # attempts after the first
    backoff: timedelta  # first retry delay; doubles each time


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str  # `from` in config.toml
    to: tuple[str, ...]
    starttls: bool
    username: str
    password_file: Path | None  # else $KEYD_SMTP_PASSWORD or the credential `smtp-password`
    timeout: float


@dataclass(frozen=True)
class AlertSettings:
    thresholds: tuple[timedelta, ...]
    webhook: WebhookSettings | None = None
    smtp: SmtpSettings | None = None


@dataclass(frozen=True)
class TransportDeploySettings:
    """Where the active transport key goes for the TLS terminator (unset: nowhere)."""

    cert_path: Path | None = None
    key_path: Path | None = None
    reload_command: tuple[str, ...] = ()  # argv, run without a shell


@dataclass(frozen=True)
class SchedulerSettings:
    interval: timedelta = timedelta(seconds=60)
    renew_interval: timedelta = timedelta(minutes=5)  # backend credential renewal
    # A key intent older than this whose process may still live is erased by recovery.
    intent_grace: timedelta = timedelta(minutes=10)
    lease: timedelta = timedelta(seconds=10)  # leader lease among replicas and workers


@dataclass(frozen=True)
class IssuerSettings:
    name: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    max_age: timedelta  # how long a fetched set is trusted
    refetch_cooldown: timedelta  # at most one refetch per cool-down on an unknown kid
    iat_max_age: timedelta  # PayNet: a message signature's iat within 5 minutes
    fetch_timeout: float
    max_bytes: int
    iss: str = ""  # when set, a message's `iss` (header or claim) must equal it
    require: tuple[str, ...] = ()  # protected-header members every message must carry
    leeway: timedelta = timedelta(seconds=10)  # clock leeway for exp / nbf / iat
    link_prefixes: tuple[str, ...] = ()  # universal links: allowed prefixes of the link
    redirect_uri_prefixes: tuple[str, ...] = ()  # ... and of its redirect_uri


@dataclass(frozen=True)
class Settings:
    path: Path
    keyd: KeydSettings
    public: PublicSettings
    api: ApiSettings
    store: StoreSettings
    backend: BackendSettings
    lifecycle: dict[Purpose, LifecycleSettings]
    alerts: AlertSettings
    issuers: dict[str, IssuerSettings] = field(default_factory=dict)
    deploy: TransportDeploySettings = field(default_factory=TransportDeploySettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    def enabled_purposes(self) -> list[Purpose]:
        return [p for p in Purpose if self.lifecycle[p].enabled]


# --------------------------------------------------------------------------- reading

_ISSUER_ALGS = {"PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
_SANDBOX_DEFAULTS = {
    "validity": "397d",
    "rotate_after": "90d",
    "prepublish": "2d",
    "overlap": "7d",
    "renew_before": "30d",
}
_PRODUCTION_DEFAULTS = {
    "validity": "397d",
    "rotate_after": "365d",
    # PayNet's consumers cache a JWKS for up to 15 minutes: publish well before use.
    "prepublish": "2d",
    # A retired key stays published until every token made with it has expired.
    "overlap": "7d",
    "renew_before": "30d",
}


class _Table:
    """A TOML table that remembers which keys were read, to refuse unknown ones."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"[{where}] must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.seen: set[str] = set()

    def _get(self, key: str, default: object) -> object:
        self.seen.add(key)
        return self.data.get(key, default)

    def name(self, key: str) -> str:
        return f"[{self.where}] {key}"

    def text(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.name(key)} must be a string, not {value!r}")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.name(key)} must be an integer, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.name(key)} must be true or false, not {value!r}")
        return value

    def duration(self, key: str, default: str) -> timedelta:
        return parse_duration(self._get(key, default), self.name(key))

    def table(self, key: str) -> _Table:
        return _Table(self._get(key, {}), f"{self.where}.{key}" if self.where else key)

    def str_list(self, key: str, default: list[str]) -> list[str]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.name(key)} must be a list of strings, not {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            where = f"[{self.where}] has unknown key" if self.where else "unknown table"
            near = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.6)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            raise ConfigError(f"{where} {unknown[0]!r}{hint}")


def _workers(table: _Table) -> int | None:
    """``[api] workers``: "auto" (None here: decided once the backend is known)
    or 1 and up."""
    value = table._get("workers", "auto")
    if value == "auto":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
        raise ConfigError(f"{table.name('workers')} must be \"auto\" or an integer from 1 "
                          f"to 256, not {value!r}")
    return value


def _listen(value: str, where: str, *, loopback_only: bool) -> Listen:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not HOST:PORT")
    if loopback_only and not _is_loopback(host):
        raise ConfigError(f"{where}: the local API listens on loopback only, not {host!r}")
    return Listen(host, int(port))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _policies_dir(base: Path, value: str) -> Path:
    """``policies_dir`` when set; else ``policies/`` beside the config file when
    it exists (an operator's /etc/keyd/policies); else the shipped defaults."""
    if value:
        return _path(base, value)
    if (beside := base / "policies").is_dir():
        return beside
    return default_policies_dir()


def _read_lifecycle(
    t: _Table, purpose: Purpose, mode: Mode, throwaway: bool, backend: str
) -> LifecycleSettings:
    defaults = _PRODUCTION_DEFAULTS if mode is Mode.PRODUCTION else _SANDBOX_DEFAULTS
    size = t.integer("key_size", 2048)
    if size not in ALLOWED_KEY_SIZES:
        raise ConfigError(f"{t.name('key_size')}: {size} is not {one_of(ALLOWED_KEY_SIZES)}")
    settings = LifecycleSettings(
        purpose=purpose,
        enabled=t.flag("enabled", True),
        key_size=size,
        validity=t.duration("validity", defaults["validity"]),
        rotate_after=t.duration("rotate_after", defaults["rotate_after"]),
        prepublish=t.duration("prepublish", defaults["prepublish"]),
        overlap=t.duration("overlap", defaults["overlap"]),
        renew_before=t.duration("renew_before", defaults["renew_before"]),
        # An HSM never lets a key out, so there the transport key stays on the
        # token (a TLS terminator then uses the token through PKCS#11).
        exportable=t.flag("exportable", purpose is Purpose.TRANSPORT and backend != "pkcs11"),
        max_published=t.integer("max_published", 10),
    )
    t.done()
    if settings.max_published < 2:
        raise ConfigError(f"{t.name('max_published')} must be at least 2 (old and new key)")
    if settings.exportable and purpose is not Purpose.TRANSPORT:
        raise ConfigError(f"{t.name('exportable')}: only the transport key may be exportable")
    if settings.exportable and backend == "pkcs11":
        raise ConfigError(
            f"{t.name('exportable')}: keys on an HSM are never exportable; set it to false"
        )
    if settings.validity < MIN_PRODUCTION_VALIDITY and not throwaway:
        raise ConfigError(
            f"{t.name('validity')}: {settings.validity.days} days is under the platform's "
            "12 months; set [keyd] throwaway = true only for a disposable test store"
        )
    if settings.rotate_after <= timedelta(0):
        raise ConfigError(f"{t.name('rotate_after')} must be longer than 0s")
    if settings.rotate_after + settings.prepublish > settings.validity:
        raise ConfigError(
            f"[{t.where}]: rotate_after + prepublish exceeds validity: a key would "
            "sign past its certificate's expiry"
        )
    return settings


# Protected-header members an issuer's profile may require of every message.
_REQUIRABLE = frozenset({"iat", "jti", "iss", "crit", "typ", "cty"})


def _prefixes(t: _Table, key: str, *, https_only: bool) -> tuple[str, ...]:
    """URL prefixes that end their authority: ``https://dp.example.my/`` and not
    ``https://dp.example.my``, which ``https://dp.example.my.evil.test`` starts with."""
    prefixes = tuple(t.str_list(key, []))
    for prefix in prefixes:
        parts = urlsplit(prefix)
        if (not parts.scheme or not parts.netloc or not parts.path.endswith("/")
                or (https_only and parts.scheme != "https") or parts.query or parts.fragment):
            raise ConfigError(
                f"{t.name(key)}: {prefix!r} must be a URL whose path ends in '/' "
                f"(like \"https://dp.example.my/ofm/\")"
            )
    return prefixes


def _read_issuer(name: str, t: _Table) -> IssuerSettings:
    uri = t.text("jwks_uri", "")
    parts = urlsplit(uri)
    if parts.scheme == "https" and parts.hostname:
        pass
    elif parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        pass
    else:
        raise ConfigError(
            f"{t.name('jwks_uri')}: {uri!r} must be https (or http to a loopback host)"
        )
    algorithms = tuple(t.str_list("algorithms", ["PS256"]))
    bad = [a for a in algorithms if a not in _ISSUER_ALGS]
    if bad or not algorithms:
        raise ConfigError(
            f"{t.name('algorithms')}: {one_of(bad, 'and') if bad else 'an empty list'} "
            f"not allowed; use {one_of(sorted(_ISSUER_ALGS))}"
        )
    settings = IssuerSettings(
        name=name,
        jwks_uri=uri,
        algorithms=algorithms,
        max_age=t.duration("max_age", "15m"),
        refetch_cooldown=t.duration("refetch_cooldown", "30s"),
        iat_max_age=t.duration("iat_max_age", "5m"),
        fetch_timeout=float(t.integer("fetch_timeout", 5)),
        max_bytes=t.integer("max_bytes", 512 * 1024),
        iss=t.text("iss", ""),
        require=tuple(t.str_list("require", [])),
        leeway=t.duration("leeway", "10s"),
        link_prefixes=_prefixes(t, "link_prefixes", https_only=True),
        redirect_uri_prefixes=_prefixes(t, "redirect_uri_prefixes", https_only=False),
    )
    t.done()
    unknown = sorted(set(settings.require) - _REQUIRABLE)
    if unknown:
        raise ConfigError(
            f"{t.name('require')}: {unknown!r} cannot be required; choose from "
            f"{sorted(_REQUIRABLE)}"
        )
    if "iss" in settings.require and not settings.iss:
        raise ConfigError(f"{t.name('require')} names iss: set {t.name('iss')} too")
    if settings.leeway > timedelta(minutes=5):
        raise ConfigError(f"{t.name('leeway')} must be at most 5m, not {settings.leeway}")
    if not 0 < settings.fetch_timeout <= 5:
        raise ConfigError(f"{t.name('fetch_timeout')} must be between 1 and 5 seconds")
    return settings


def _read_webhook(t: _Table) -> WebhookSettings:
    url = t.text("url", "")
    parts = urlsplit(url)
    if not (parts.hostname and (parts.scheme == "https" or
                                (parts.scheme == "http" and _is_loopback(parts.hostname)))):
        raise ConfigError(f"{t.name('url')}: {url!r} must be https (or http to a loopback host)")
    settings = WebhookSettings(
        url=url,
        timeout=float(t.integer("timeout", 5)),
        retries=t.integer("retries", 3),
        backoff=t.duration("backoff", "2s"),
    )
    t.done()
    if not 0 < settings.timeout <= 60 or not 0 <= settings.retries <= 10:
        raise ConfigError(f"[{t.where}]: timeout must be 1-60 s and retries 0-10")
    return settings


def _read_smtp(t: _Table, base: Path) -> SmtpSettings:
    settings = SmtpSettings(
        host=t.text("host", ""),
        port=t.integer("port", 587),
        sender=t.text("from", ""),
        to=tuple(t.str_list("to", [])),
        starttls=t.flag("starttls", True),
        username=t.text("username", ""),
        password_file=_path(base, f) if (f := t.text("password_file", "")) else None,
        timeout=float(t.integer("timeout", 10)),
    )
    t.done()
    if not settings.host or not settings.sender or not settings.to:
        raise ConfigError(f"[{t.where}] needs host, from and at least one address in to")
    if not 0 < settings.port <= 65535:
        raise ConfigError(f"{t.name('port')}: {settings.port} is not a port")
    return settings


def load(path: Path | str | None = None) -> Settings:
    """Read and validate config.toml: ``path``, else $KEYD_CONFIG, else ./config.toml."""
    chosen = Path(path or os.environ.get("KEYD_CONFIG") or "config.toml")
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {chosen} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {chosen} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {chosen} is not valid TOML: {e}") from None
    return from_dict(raw, chosen.resolve())


def from_dict(raw: dict[str, Any], path: Path) -> Settings:
    base = path.parent
    root = _Table(raw, "")
    k = root.table("keyd")
    try:
        mode = Mode(k.text("mode", "sandbox"))
    except ValueError:
        mode_value = k.data.get("mode")
        raise ConfigError(f"[keyd] mode: {mode_value!r} is not sandbox or production") from None
    try:
        kid = KidScheme(k.text("kid", "x5t#S256"))
    except ValueError:
        raise ConfigError(f"[keyd] kid: {k.data.get('kid')!r} is not "
                          f"{one_of([s.value for s in KidScheme])}") from None
    data_dir = _path(base, k.text("data_dir", "var"))
    keyd = KeydSettings(
        mode=mode,
        data_dir=data_dir,
        client_id=k.text("client_id", ""),
        organisation=k.text("organisation", ""),
        kid=kid,
        policies_dir=_policies_dir(base, k.text("policies_dir", "")),
        publish_transport=k.flag("publish_transport", False),
        throwaway=k.flag("throwaway", False),
        country=k.text("country", "MY"),
    )
    k.done()
    if not keyd.client_id:
        raise ConfigError("[keyd] client_id must be set (the platform-issued OIDC client_id)")
    if not keyd.organisation:
        raise ConfigError("[keyd] organisation must be set (the certificate subject O)")
    if len(keyd.country) != 2:
        raise ConfigError(f"[keyd] country: {keyd.country!r} is not a 2-letter ISO code")

    p = root.table("public")
    public = PublicSettings(
        listen=_listen(p.text("listen", "127.0.0.1:8080"), p.name("listen"), loopback_only=False),
        max_age=p.integer("max_age", 300),
    )
    p.done()

    a = root.table("api")
    api_listen = a.text("listen", "127.0.0.1:8081")
    workers = _workers(a)
    api_socket = a.text("socket", "var/keyd.sock")
    api = ApiSettings(
        listen=_listen(api_listen, a.name("listen"), loopback_only=True) if api_listen else None,
        socket=_path(base, api_socket) if api_socket else None,
        max_body=a.integer("max_body", 256 * 1024),
        rate_limit=float(a.integer("rate_limit", 1000)),
        rate_burst=a.integer("rate_burst", 2000),
        header_timeout=a.duration("header_timeout", "10s"),
        body_timeout=a.duration("body_timeout", "10s"),
        max_header_bytes=a.integer("max_header_bytes", 16 * 1024),
        workers=workers or 1,
    )
    a.done()
    if api.listen is None and api.socket is None:
        raise ConfigError("[api] needs a listen address, a socket, or both")

    s = root.table("store")
    store = StoreSettings(url=s.text("url", f"sqlite:///{data_dir / 'keyd.db'}"))
    s.done()

    b = root.table("backend")
    kind = b.text("kind", "local")
    if kind not in ("local", "vault", "pkcs11"):
        raise ConfigError(f"[backend] kind: {kind!r} is not local, vault or pkcs11")
    bl = b.table("local")
    local = LocalBackendSettings(
        master_key_file=_path(data_dir, bl.text("master_key_file", "master.key"))
    )
    bl.done()
    bv = b.table("vault")
    vault = VaultBackendSettings(
        addr=bv.text("addr", "") or os.environ.get("VAULT_ADDR", "http://127.0.0.1:8200"),
        mount=bv.text("mount", "transit"),
        key_prefix=bv.text("key_prefix", "keyd-"),
        namespace=bv.text("namespace", ""),
        auth=bv.text("auth", "token"),
        token_file=_path(base, f) if (f := bv.text("token_file", "")) else None,
        role_id=bv.text("role_id", ""),
        secret_id_file=_path(base, f) if (f := bv.text("secret_id_file", "")) else None,
        timeout=float(bv.integer("timeout", 2)),
        approle_mount=bv.text("approle_mount", "approle"),
    )
    bv.done()
    if vault.auth not in ("token", "approle"):
        raise ConfigError(f"[backend.vault] auth: {vault.auth!r} is not token or approle")
    bp = b.table("pkcs11")
    pkcs11 = Pkcs11BackendSettings(
        module=Path(bp.text("module", "/usr/lib/softhsm/libsofthsm2.so")),
        token_label=bp.text("token_label", "keyd"),
        token_serial=bp.text("token_serial", ""),
        pin_file=_path(base, f) if (f := bp.text("pin_file", "")) else None,
        oaep_sha256=bp.text("oaep_sha256", "auto"),
        sessions=bp.integer("sessions", 4),
    )
    bp.done()
    if pkcs11.oaep_sha256 not in ("auto", "token", "raw"):
        raise ConfigError(
            f"[backend.pkcs11] oaep_sha256: {pkcs11.oaep_sha256!r} is not auto, token or raw"
        )
    b.done()
    backend = BackendSettings(kind=kind, local=local, vault=vault, pkcs11=pkcs11)
    if workers is None:
        # "auto": one worker per core, except on an HSM.  There the token is
        # the bottleneck (bench/sign_pkcs11.py: one process already matches a
        # direct PKCS#11 loop), and several processes opening one SoftHSM2
        # token directory is untested; an explicit `workers` still applies.
        workers = 1 if kind == "pkcs11" else max(1, len(os.sched_getaffinity(0)))
        api = replace(api, workers=workers)

    lt = root.table("lifecycle")
    lifecycle = {
        purpose: _read_lifecycle(
            lt.table(purpose.value), purpose, mode, keyd.throwaway, backend.kind
        )
        for purpose in Purpose
    }
    lt.done()
    if not any(ls.enabled for ls in lifecycle.values()):
        raise ConfigError("[lifecycle] every purpose is disabled; enable at least one")

    al = root.table("alerts")
    thresholds = tuple(
        sorted(
            (parse_duration(v, al.name("thresholds")) for v in
             al.str_list("thresholds", ["30d", "14d", "7d", "3d", "1d"])),
            reverse=True,
        )
    )
    webhook = _read_webhook(al.table("webhook")) if "webhook" in al.data else None
    smtp = _read_smtp(al.table("smtp"), base) if "smtp" in al.data else None
    alerts = AlertSettings(thresholds=thresholds, webhook=webhook, smtp=smtp)
    al.done()

    dp = root.table("deploy")
    dt = dp.table("transport")
    deploy = TransportDeploySettings(
        cert_path=_path(base, f) if (f := dt.text("cert_path", "")) else None,
        key_path=_path(base, f) if (f := dt.text("key_path", "")) else None,
        reload_command=tuple(dt.str_list("reload_command", [])),
    )
    dt.done()
    dp.done()

    sc = root.table("scheduler")
    scheduler = SchedulerSettings(
        interval=sc.duration("interval", "60s"),
        renew_interval=sc.duration("renew_interval", "5m"),
        intent_grace=sc.duration("intent_grace", "10m"),
        lease=sc.duration("lease", "10s"),
    )
    sc.done()
    if scheduler.interval < timedelta(seconds=1):
        raise ConfigError(f"{sc.name('interval')} must be at least 1s")
    if scheduler.lease < timedelta(seconds=1):
        raise ConfigError(f"{sc.name('lease')} must be at least 1s")
    if scheduler.renew_interval < timedelta(seconds=1):
        raise ConfigError(f"{sc.name('renew_interval')} must be at least 1s")

    it = root.table("issuers")
    issuers = {name: _read_issuer(name, it.table(name)) for name in list(it.data)}
    it.seen.update(issuers)
    it.done()

    root.done()
    return Settings(
        path=path,
        keyd=keyd,
        public=public,
        api=api,
        store=store,
        backend=backend,
        lifecycle=lifecycle,
        alerts=alerts,
        issuers=issuers,
        deploy=deploy,
        scheduler=scheduler,
    )
