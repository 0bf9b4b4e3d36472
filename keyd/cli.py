"""The `keyd` command: arguments in, a KeyService call, output out.

Every failure is one line on standard error and a non-zero exit: 1 for an
error keyd understood, 2 for a usage error, 70 for a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyd import config
from keyd.audit import EventFilter
from keyd.errors import BackendUnavailable, KeydError
from keyd.logs import setup_logging
from keyd.model import Purpose

if TYPE_CHECKING:
    from keyd.api.server import Listeners
    from keyd.api.workers import Worker
    from keyd.service import KeyInfo, KeyService

# Imports stay inside the commands: `keyd --help` and `keyd status` pay only
# for what they use (bench/cli_startup.py measures it; tests/daemon/test_cli_startup.py
# keeps SQLAlchemy, Alembic, httpx, hvac, pkcs11 and the web stack out).

EXIT_ERROR, EXIT_USAGE, EXIT_BUG = 1, 2, 70


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"keyd: {message} (see `keyd --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# A kid is base64url: one in 64 starts with "-", which argparse takes for an
# option unless "--" comes first (keyd revoke --reason R -- -AbC...).
KID_HELP = "the key's id or kid (one that starts with a dash goes after --)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="keyd", description="Key and certificate daemon for Open Finance.")
    p.add_argument("--config", help="config file (default $KEYD_CONFIG, then ./config.toml)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("init", help="create the store and one key per enabled purpose")
    sub.add_parser("serve", help="run the JWKS listener and the local API")
    keys = sub.add_parser("keys", help="key versions").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser)
    kl = keys.add_parser("list", help="every key version")
    kl.add_argument("--json", action="store_true")
    sub.add_parser("jwks", help="print the public JWKS")
    csr = sub.add_parser("csr", help="print a key's CSR (PEM)")
    csr.add_argument("kid", help=KID_HELP)
    cert = sub.add_parser("cert", help="certificates").add_subparsers(
        dest="cert_command", required=True, parser_class=_Parser)
    ci = cert.add_parser("import", help="attach a CA-issued certificate chain to its key")
    ci.add_argument("kid", help=KID_HELP)
    ci.add_argument("file", type=Path)
    ci.add_argument("--kid", dest="assigned_kid", help="a directory-assigned kid to pin")
    client = sub.add_parser("client", help="local API clients").add_subparsers(
        dest="client_command", required=True, parser_class=_Parser)
    ca = client.add_parser("add", help="add a client; prints its bearer token once")
    ca.add_argument("name")
    ca.add_argument("--policy", required=True)
    ca.add_argument("--json", action="store_true")
    rot = sub.add_parser("rotate", help="start a rotation of PURPOSE now")
    rot.add_argument("purpose", choices=[p.value for p in Purpose])
    rot.add_argument("--now", action="store_true",
                     help="activate at once, skipping pre-publication: verifiers with a cached "
                          "JWKS reject the new key's tokens until they refetch (emergencies)")
    rev = sub.add_parser("revoke", help="revoke a key: out of the JWKS, refused at once")
    rev.add_argument("kid", help=KID_HELP)
    rev.add_argument("--reason", required=True)
    al = sub.add_parser("alerts", help="alert channels").add_subparsers(
        dest="alerts_command", required=True, parser_class=_Parser)
    al.add_parser("test", help="send a test alert to every configured channel")
    st = sub.add_parser("status", help="expiries at a glance, and the issuers' keys")
    st.add_argument("--json", action="store_true")
    st.add_argument("--issuers", action="store_true",
                    help="with --json: an object with the keys and the issuers section")
    audit = sub.add_parser("audit", help="the audit log")
    audit.add_argument("audit_command", nargs="?", choices=["list", "verify", "head"],
                       default="list")
    audit.add_argument("--expect", metavar="LENGTH:HASH",
                       help="verify: fail unless the chain still reaches this earlier head")
    audit.add_argument("--action")
    audit.add_argument("--kid")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true")
    return p


@contextmanager
def _service(args: argparse.Namespace, *, require_backend: bool = True) -> Iterator[KeyService]:
    from keyd.service import KeyService

    service = KeyService.open(config.load(args.config), require_backend=require_backend)
    try:
        yield service
    finally:
        service.close()


def _rfc3339(when: datetime) -> str:
    """Seconds, UTC, "Z"; a naive time is the store's UTC."""
    utc = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _relative(when: datetime, now: datetime) -> str:
    """"in 12 d", "in 5 h", "in 3 min", "now", "2 d ago": the largest whole unit."""
    seconds = (when - now).total_seconds()
    size = abs(seconds)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if size >= span:
            amount = f"{int(size // span)} {unit}"
            return f"in {amount}" if seconds > 0 else f"{amount} ago"
    return "now"


def _when(when: datetime | None, now: datetime) -> str:
    """RFC 3339 and relative: "2027-01-01T00:00:00Z (in 397 d)"."""
    return "-" if when is None else f"{_rfc3339(when)} ({_relative(when, now)})"


def _print_keys(keys: list[KeyInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([k.to_json() for k in keys], indent=2))
        return
    print(f"{'KID':<45} {'PURPOSE':<11} {'STATE':<21} {'ALG':<13} NOT AFTER")
    for k in keys:
        not_after = k.to_json()["not_after"] or "-"
        print(f"{k.kid or k.id:<45} {k.purpose.value:<11} {k.state.value:<21} "
              f"{k.alg or '-':<13} {not_after}")


def cmd_init(args: argparse.Namespace) -> None:
    from keyd import backends

    for line in backends.prepare(config.load(args.config)):
        print(line, file=sys.stderr)
    with _service(args) as service:
        keys = service.init()
    _print_keys(keys, as_json=False)
    waiting = [k for k in keys if k.state.value == "awaiting_certificate"]
    if waiting:
        # Production: nothing signs until the CA's certificates are imported.
        print("next: for each key above, send its CSR to your CA and import the chain it returns:",
              file=sys.stderr)
        for k in waiting:
            print(f"  keyd csr {k.id} > {k.purpose.value}.csr   then   "
                  f"keyd cert import {k.id} {k.purpose.value}-chain.pem", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from keyd.api.server import (
        bind_listeners,
        lock_data_dir,
        release_listeners,
        socket_inode,
    )

    settings = config.load(args.config)
    # The data_dir lock and the listeners first: a second daemon refused here
    # (busy port, live socket) exits having recovered and changed nothing.
    # Workers inherit both from this process: they share the lock, not fight it.
    lock_data_dir(settings)
    listeners = bind_listeners(settings)
    if settings.api.workers == 1:
        _serve_one(args, listeners, None)
        return
    from keyd.api.workers import supervise

    inode = socket_inode(settings)

    def run_worker(worker: Worker) -> int:
        try:
            _serve_one(args, listeners, worker)
        except KeydError as e:
            print(f"keyd: error: {e.detail}", file=sys.stderr)
            return EXIT_ERROR
        return 0

    code = supervise(settings.api.workers, run_worker, listeners[1],
                     settings.keyd.data_dir / "endpoints.json",
                     lambda: release_listeners(settings, inode))
    if code:
        raise SystemExit(code)


def _serve_one(args: argparse.Namespace, listeners: Listeners, worker: Worker | None) -> None:
    """One serving process: the service, its lease, the scheduler, the listeners."""
    from keyd.api.server import serve
    from keyd.jobs import Jobs
    from keyd.scheduler import Scheduler

    with _service(args, require_backend=False) as service:
        settings = service.settings
        service.check_clock()
        try:
            service.init()
        except BackendUnavailable as e:
            # Keys already exist (or cannot be made now): serve what the store has.
            logging.getLogger("keyd").warning("init skipped: %s", e.detail)
        lease = service.start_lease(settings.scheduler.lease,
                                    listeners[1].get("api") or listeners[1].get("socket"))
        jobs = Jobs(service)
        scheduler = Scheduler(jobs, lease)
        # The leader (one among all replicas and workers) runs the lifecycle
        # (recovery first) once before serving, then every [scheduler]
        # interval; the others serve.
        if lease.tick():
            report = scheduler.run_if_leader()
            for error in report.errors if report is not None else []:
                logging.getLogger("keyd").error("start-up jobs: %s", error)
        lease.on_change = scheduler.wake
        lease.start()
        scheduler.start()
        try:
            serve(service, listeners, worker)
        finally:
            scheduler.stop()
            lease.stop()


def cmd_rotate(args: argparse.Namespace) -> None:
    with _service(args) as service:
        service.admin_caller()  # the CLI acts as admin; no admin policy, no rotation
        info = service.rotate(Purpose(args.purpose), actor="cli", now=args.now)
        now = service.clock.now()
    line = f"{info.purpose.value} key {info.kid or info.id} is {info.state.value}"
    if info.activates_at is not None:
        line += (f"; published now, it starts signing at {_rfc3339(info.activates_at)} "
                 f"({_relative(info.activates_at, now)})")
    elif info.state.value == "awaiting_certificate":
        line += f"; next: keyd csr {info.id}, then keyd cert import {info.id} CHAIN.pem"
    print(line)


def cmd_revoke(args: argparse.Namespace) -> None:
    with _service(args) as service:
        service.admin_caller()
        info, replacement = service.revoke(args.kid, reason=args.reason, actor="cli")
    print(f"revoked {info.purpose.value} key {info.kid or info.id}")
    if replacement is not None:
        print(f"{replacement.purpose.value} key {replacement.kid or replacement.id} is "
              f"{replacement.state.value}")
    elif info.state.value == "revoked":
        print(f"keyd: warning: no replacement {info.purpose.value} key activated",
              file=sys.stderr)


def cmd_alerts(args: argparse.Namespace) -> None:
    from keyd.alerts import Alert

    with _service(args) as service:
        failed = service.alerter().send(Alert(
            subject="test", title="keyd test alert", severity="info",
            text="A test alert sent by `keyd alerts test`: this channel works."))
    if failed:
        raise KeydError(f"test alert failed on: {', '.join(failed)}")
    print("test alert sent to the log" + "".join(
        f", {c}" for c, on in (("webhook", service.settings.alerts.webhook),
                               ("smtp", service.settings.alerts.smtp)) if on is not None))


def cmd_keys(args: argparse.Namespace) -> None:
    with _service(args) as service:
        _print_keys(service.keys(), args.json)


def cmd_jwks(args: argparse.Namespace) -> None:
    with _service(args) as service:
        body, _ = service.jwks()
        print(json.dumps(json.loads(body), indent=2))


def cmd_csr(args: argparse.Namespace) -> None:
    with _service(args) as service:
        sys.stdout.write(service.csr(args.kid, actor="cli"))


def cmd_cert(args: argparse.Namespace) -> None:
    try:
        data = args.file.read_bytes()
    except OSError as e:
        raise KeydError(f"cannot read {args.file}: {e.strerror}") from None
    with _service(args) as service:
        info, warnings = service.import_certificate(
            args.kid, data, actor="cli", assigned_kid=args.assigned_kid
        )
    for warning in warnings:
        print(f"keyd: warning: {warning}", file=sys.stderr)
    print(f"imported certificate for {info.purpose.value} key {info.kid} ({info.state.value})")


def cmd_client(args: argparse.Namespace) -> None:
    with _service(args) as service:
        token = service.add_client(args.name, args.policy, actor="cli")
    if args.json:
        print(json.dumps({"name": args.name, "policy": args.policy, "token": token}))
    else:
        print(token)


def _issuer_status(service: KeyService) -> list[dict[str, Any]]:
    """Each configured issuer, fetched now: its kept kids, dropped keys and why."""
    report = []
    for issuer in service.issuers.values():
        try:
            issuer.refresh()
        except KeydError:
            pass  # last_error in the status says why
        report.append(issuer.status())
    return report


def _print_issuers(issuers: list[dict[str, Any]]) -> None:
    if not issuers:
        return
    print(f"\n{'ISSUER':<16} {'KEYS':>4} {'DROPPED':>7}  JWKS")
    for i in issuers:
        print(f"{i['issuer']:<16} {len(i['kids']):>4} {len(i['dropped']):>7}  {i['jwks_uri']}")
        for reason in i["dropped"]:
            print(f"  dropped: {reason}")
        if i["last_error"]:
            print(f"  error: {i['last_error']}")


def cmd_status(args: argparse.Namespace) -> None:
    with _service(args) as service:
        now = service.clock.now()
        keys = [k for k in service.keys() if k.state.value not in ("destroyed", "revoked")]
        issuers = _issuer_status(service) if args.issuers or not args.json else []
        recently = max(3 * service.settings.scheduler.lease, timedelta(minutes=1))
        replicas = service.replicas(recently)
    keys.sort(key=lambda k: (k.not_after is None, k.not_after or now))
    if args.json:
        listed = [{**k.to_json(), "days_left": None if k.not_after is None else
                   round((k.not_after - now).total_seconds() / 86400, 2)} for k in keys]
        # --json alone keeps its shape (a list of keys) for existing scripts.
        print(json.dumps({"keys": listed, "issuers": issuers} if args.issuers else listed,
                         indent=2))
        return
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    rows = [(k.purpose.value, k.state.value, _when(k.not_after, now),
             f"{k.kid or k.id}" + (f"  starts signing {_when(k.activates_at, now)}"
                                   if k.activates_at is not None else "")) for k in keys]
    width = max([len("EXPIRES"), *(len(r[2]) for r in rows)])
    print(f"{'PURPOSE':<11} {'STATE':<21} {'EXPIRES':<{width}}  KID")
    for k, (purpose, state, expires, kid) in zip(keys, rows, strict=True):
        line = f"{purpose:<11} {state:<21} {expires:<{width}}  {kid}"
        print(_coloured(line, k, now, service.settings.alerts.thresholds) if colour else line)
    _print_issuers(issuers)
    if replicas:
        print(f"\n{'REPLICA':<40} {'ROLE':<8} SEEN")
        for r in replicas:
            print(f"{r['replica']!s:<40} {'leader' if r['leader'] else 'follower':<8} "
                  f"{r['seen_seconds_ago']}s ago")
    missing = {p for p in Purpose} - {k.purpose for k in keys if k.state.value == "active"}
    for purpose in sorted(p.value for p in missing & set(service.settings.enabled_purposes())):
        print(f"keyd: warning: no active {purpose} key", file=sys.stderr)


def _coloured(line: str, key: KeyInfo, now: datetime,
              thresholds: tuple[timedelta, ...]) -> str:
    """Red under the last alert threshold, yellow under the first, else plain."""
    if key.not_after is None:
        return line
    left = key.not_after - now
    if thresholds and left <= thresholds[-1]:
        return f"\033[31m{line}\033[0m"
    if thresholds and left <= thresholds[0]:
        return f"\033[33m{line}\033[0m"
    return line


def cmd_audit(args: argparse.Namespace) -> None:
    from keyd.audit import parse_head

    expected = None
    if args.expect is not None:
        try:
            expected = parse_head(args.expect)
        except ValueError as e:
            raise KeydError(f"--expect: {e}") from None
    with _service(args) as service:
        if args.audit_command == "head":
            length, digest = service.audit_head()
            print(f"{length}:{digest}")
            return
        if args.audit_command == "verify":
            broken = service.audit_verify()
            if broken is not None:
                raise KeydError(f"audit chain broken at event {broken}")
            if expected is not None and (why := service.audit_reaches(*expected)) is not None:
                raise KeydError(f"audit chain does not reach {args.expect.strip()}: {why}")
            length, digest = service.audit_head()
            print(f"audit chain intact: {length} events, head {digest}"
                  + ("" if expected is None else f", reaches {expected[0]}:{expected[1]}"))
            return
        rows = service.audit_events(EventFilter(action=args.action, kid=args.kid),
                                   limit=args.limit)
    records = [{
        "segment": row.segment, "seq": row.seq, "at": row.at.isoformat(), "actor": row.actor,
        "action": row.action, "kid": row.kid, "outcome": row.outcome, "detail": row.detail,
    } for row in rows]
    if args.json:
        print(json.dumps(records, indent=2))
        return
    table = [(str(row.seq), _rfc3339(row.at), row.actor, row.action, row.outcome, row.kid or "-")
             for row in rows]
    header = ("SEQ", "AT", "ACTOR", "ACTION", "OUTCOME", "KID")
    widths = [max([len(h), *(len(r[i]) for r in table)]) for i, h in enumerate(header)]
    for cells in (header, *table):
        print(f"{cells[0]:>{widths[0]}}  " + "  ".join(
            f"{c:<{w}}" for c, w in zip(cells[1:-1], widths[1:-1], strict=True)) + f"  {cells[-1]}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init": cmd_init,
    "serve": cmd_serve,
    "keys": cmd_keys,
    "jwks": cmd_jwks,
    "csr": cmd_csr,
    "cert": cmd_cert,
    "client": cmd_client,
    "status": cmd_status,
    "rotate": cmd_rotate,
    "revoke": cmd_revoke,
    "alerts": cmd_alerts,
    "audit": cmd_audit,
}


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # every file keyd writes (keyd.db, its journals, locks) is 0600
    args = _parser().parse_args(argv)
    serving = args.command == "serve"
    # serve: JSON lines off a terminal (journald), text at one; admin commands
    # are read by a person: text.  $KEYD_LOG_FORMAT=json|text overrides.
    setup_logging(
        json_format=None if serving else os.environ.get("KEYD_LOG_FORMAT") == "json",
        level=logging.INFO if serving else logging.WARNING,
    )
    # Libraries say only problems: migrations running and jobs being added are not news.
    for noisy in ("alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        COMMANDS[args.command](args)
    except KeydError as e:
        print(f"keyd: error: {e.detail}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        print(f"keyd: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BUG
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
