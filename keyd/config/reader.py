"""config.toml, read once into frozen, typed settings (:mod:`keyd.config.settings`).

Every error names the offending key (``[lifecycle.signing] validity``) and
the value.  Relative paths resolve against the config file's folder.  Secrets
never come from config.toml itself (:mod:`keyd.config.secrets`).  Each
``[backend.<kind>]`` table is read by that backend's plugin, and what the
chosen backend can do (its static ``Capabilities``) sets the defaults that
depend on it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from keyd import backends
from keyd.config.settings import (
    AlertSettings,
    ApiSettings,
    BackendSettings,
    IssuerSettings,
    KeydSettings,
    LifecycleSettings,
    Listen,
    PublicSettings,
    SchedulerSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    TransportDeploySettings,
    WebhookSettings,
)
from keyd.config.table import Table, one_of, parse_duration, resolve_path
from keyd.errors import ConfigError
from keyd.model import ALLOWED_KEY_SIZES, ISSUER_ALGORITHMS, MIN_RSA_BITS, KidScheme, Mode, Purpose
from keyd.resources import default_policies_dir

if TYPE_CHECKING:
    # Only a type here: `keyd --help` reads no config and must not load cryptography.
    from keyd.backends.base import Capabilities

MIN_PRODUCTION_VALIDITY = timedelta(days=365)
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



def _workers(table: Table) -> int | None:
    """``[api] workers``: "auto" (None here: decided once the backend is known)
    or 1 and up."""
    value = table.get("workers", "auto")
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


def _policies_dir(base: Path, value: str) -> Path:
    """``policies_dir`` when set; else ``policies/`` beside the config file when
    it exists (an operator's /etc/keyd/policies); else the shipped defaults."""
    if value:
        return resolve_path(base, value)
    if (beside := base / "policies").is_dir():
        return beside
    return default_policies_dir()


def _read_lifecycle(
    t: Table, purpose: Purpose, mode: Mode, throwaway: bool, backend: Capabilities
) -> LifecycleSettings:
    defaults = _PRODUCTION_DEFAULTS if mode is Mode.PRODUCTION else _SANDBOX_DEFAULTS
    size = t.integer("key_size", MIN_RSA_BITS)
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
        exportable=t.flag("exportable",
                          purpose is Purpose.TRANSPORT and backend.exports_private_keys),
        max_published=t.integer("max_published", 10),
    )
    t.done()
    if settings.max_published < 2:
        raise ConfigError(f"{t.name('max_published')} must be at least 2 (old and new key), "
                          f"not {settings.max_published}")
    if settings.exportable and purpose is not Purpose.TRANSPORT:
        raise ConfigError(f"{t.name('exportable')}: only the transport key may be exportable")
    if settings.exportable and not backend.exports_private_keys:
        raise ConfigError(
            f"{t.name('exportable')}: keys on the {backend.name} backend are never "
            "exportable; set it to false"
        )
    if settings.validity < MIN_PRODUCTION_VALIDITY and not throwaway:
        raise ConfigError(
            f"{t.name('validity')}: {settings.validity.days} days is under the platform's "
            "12 months; set [keyd] throwaway = true only for a disposable test store"
        )
    if settings.rotate_after <= timedelta(0):
        raise ConfigError(f"{t.name('rotate_after')} must be longer than 0s, "
                          f"not {settings.rotate_after}")
    if settings.rotate_after + settings.prepublish > settings.validity:
        raise ConfigError(
            f"[{t.where}]: rotate_after + prepublish ({settings.rotate_after.days}d + "
            f"{settings.prepublish.days}d) exceeds validity ({settings.validity.days}d): "
            "a key would sign past its certificate's expiry"
        )
    return settings


# Protected-header members an issuer's profile may require of every message.
_REQUIRABLE = frozenset({"iat", "jti", "iss", "crit", "typ", "cty"})


def _prefixes(t: Table, key: str, *, https_only: bool) -> tuple[str, ...]:
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


def _read_issuer(name: str, t: Table) -> IssuerSettings:
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
    bad = [a for a in algorithms if a not in ISSUER_ALGORITHMS]
    if bad or not algorithms:
        raise ConfigError(
            f"{t.name('algorithms')}: {one_of(bad, 'and') if bad else 'an empty list'} "
            f"not allowed; use {one_of(sorted(ISSUER_ALGORITHMS))}"
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
        raise ConfigError(f"{t.name('fetch_timeout')} must be between 1 and 5 seconds, "
                          f"not {settings.fetch_timeout:g}")
    return settings


def _read_webhook(t: Table) -> WebhookSettings:
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
        raise ConfigError(f"[{t.where}]: timeout must be 1-60 s and retries 0-10, not "
                          f"{settings.timeout:g} s and {settings.retries}")
    return settings


def _read_smtp(t: Table, base: Path) -> SmtpSettings:
    settings = SmtpSettings(
        host=t.text("host", ""),
        port=t.integer("port", 587),
        sender=t.text("from", ""),
        to=tuple(t.str_list("to", [])),
        starttls=t.flag("starttls", True),
        username=t.text("username", ""),
        password_file=t.optional_path("password_file", base),
        timeout=float(t.integer("timeout", 10)),
    )
    t.done()
    if not settings.host or not settings.sender or not settings.to:
        raise ConfigError(f"[{t.where}] needs host, from and at least one address in to")
    if not 0 < settings.port <= 65535:
        raise ConfigError(f"{t.name('port')}: {settings.port} is not a port")
    return settings


def _read_backend(b: Table, base: Path, data_dir: Path) -> tuple[BackendSettings, Capabilities]:
    """``[backend]``: the kind, then its own table, read by its plugin.

    A table for another kind is read (and so checked) by that kind's plugin
    too, then dropped: a typo there is refused even while it is not in use.
    Only kinds whose table is present are imported, so a local deployment
    never loads hvac or python-pkcs11.
    """
    kind = b.text("kind", "local")
    if kind not in backends.KINDS:
        raise ConfigError(f"[backend] kind: {kind!r} is not {one_of(backends.KINDS)}")
    options = backends.plugin(kind).read_settings(b.table(kind), base, data_dir)
    for other in backends.KINDS:
        if other != kind and other in b.data:
            backends.plugin(other).read_settings(b.table(other), base, data_dir)
    b.done()
    return BackendSettings(kind=kind, options=options), backends.plugin(kind).capabilities


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
    root = Table(raw, "")
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
    data_dir = resolve_path(base, k.text("data_dir", "var"))
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
        socket=resolve_path(base, api_socket) if api_socket else None,
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

    backend, capabilities = _read_backend(root.table("backend"), base, data_dir)
    if workers is None:
        # "auto": one worker per core, except where the backend wants one
        # process (an HSM: the token is the bottleneck, bench/sign_pkcs11.py,
        # and several processes opening one SoftHSM2 token directory is
        # untested); an explicit `workers` still applies.
        workers = 1 if capabilities.one_process else max(1, len(os.sched_getaffinity(0)))
        api = replace(api, workers=workers)

    lt = root.table("lifecycle")
    lifecycle = {
        purpose: _read_lifecycle(
            lt.table(purpose.value), purpose, mode, keyd.throwaway, capabilities
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
        cert_path=dt.optional_path("cert_path", base),
        key_path=dt.optional_path("key_path", base),
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
        raise ConfigError(f"{sc.name('interval')} must be at least 1s, not {scheduler.interval}")
    if scheduler.lease < timedelta(seconds=1):
        raise ConfigError(f"{sc.name('lease')} must be at least 1s, not {scheduler.lease}")
    if scheduler.renew_interval < timedelta(seconds=1):
        raise ConfigError(f"{sc.name('renew_interval')} must be at least 1s, "
                          f"not {scheduler.renew_interval}")

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
