"""The settings config.toml is read into: frozen, typed, one dataclass per table.

Nothing here reads a file; :mod:`keyd.config.reader` builds these.  A backend's
own table (``[backend.vault]``, ...) is read by that backend's plugin
(:mod:`keyd.backends`); its settings type still lives here so that a module can
name it without importing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from keyd.model import KidScheme, Mode, Purpose

__all__ = [
    "AlertSettings",
    "ApiSettings",
    "BackendSettings",
    "IssuerSettings",
    "KeydSettings",
    "LifecycleSettings",
    "Listen",
    "LocalBackendSettings",
    "Pkcs11BackendSettings",
    "PublicSettings",
    "SchedulerSettings",
    "Settings",
    "SmtpSettings",
    "StoreSettings",
    "TransportDeploySettings",
    "VaultBackendSettings",
    "WebhookSettings",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        # An IPv6 host is bracketed, as config.toml wrote it: "[::1]:8443".
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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
    """[public]: where the JWKS is served, and how long a fetched copy may be cached."""

    listen: Listen
    max_age: int  # seconds, the JWKS's Cache-Control max-age


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
    oaep_sha256: str  # "auto" | "token" | "raw": see keyd/backends/pkcs11/backend.py
    sessions: int




@dataclass(frozen=True)
class BackendSettings:
    kind: str  # a kind in keyd.backends.KINDS: "local" | "vault" | "pkcs11"
    options: object  # that backend's own settings, read by its plugin from [backend.<kind>]

    def options_as(self, settings_type: type[_T]) -> _T:
        """The backend's settings as ``settings_type``; a backend asks for its own."""
        if not isinstance(self.options, settings_type):
            raise TypeError(f"[backend] kind {self.kind!r} has {type(self.options).__name__}, "
                            f"not {settings_type.__name__}")
        return self.options


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

