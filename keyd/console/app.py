"""The admin console at /console: pages and actions for security admins.

Sign-in takes an admin bearer token once and gives a session cookie; every
later request is checked against that client again (still there, still
admin).  Every form that changes something carries the session's CSRF token
and must come from our own origin.  Every action goes through KeyService
under the signed-in client's name, so the audit log says who did it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.console import timeline, views, web
from keyd.console.sessions import Session, SessionStore, same_secret
from keyd.errors import BadRequest, Forbidden, KeydError, NotFound, Unauthorized
from keyd.model import Purpose
from keyd.policy import Operation
from keyd.service import Caller, KeyService

log = logging.getLogger("keyd.console")

SESSION_COOKIE = "keyd-console"
SIGNIN_COOKIE = "keyd-console-signin"  # the sign-in form's own CSRF token (double submit)
AUDIT_PAGE = 50
Handler = Callable[[Request], Awaitable[Response]]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _when(at: datetime | None) -> str:
    return "—" if at is None else utc(at).strftime("%Y-%m-%d %H:%M UTC")


def _iso(at: datetime | None) -> str:
    return "" if at is None else utc(at).isoformat().replace("+00:00", "Z")


def relative(at: datetime | None, now: datetime) -> str:
    """'in 3 d 4 h' or '2 h 5 min ago': a countdown a person reads at a glance."""
    if at is None:
        return ""
    delta = utc(at) - now
    past = delta < timedelta(0)
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        text = f"{days} d {hours} h"
    elif hours:
        text = f"{hours} h {minutes} min"
    elif minutes:
        text = f"{minutes} min"
    else:
        text = f"{seconds} s"
    return f"{text} ago" if past else f"in {text}"


def duration(delta: timedelta) -> str:
    """A lifecycle setting as config.toml spells it: 15m, 2d, 36h."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("keyd.console", "templates"),
        # Every value is escaped: a client name or a revoke reason with HTML
        # in it is shown as text, never as markup.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["iso"] = _iso
    env.filters["duration"] = duration
    env.filters["path"] = lambda value: quote(str(value), safe="")
    # Audit details as they were recorded: text as is, anything else as JSON.
    env.filters["plain"] = lambda value: value if isinstance(value, str) else json.dumps(value)
    return env


class Console:
    def __init__(self, service: KeyService) -> None:
        self.service = service
        self.sessions = SessionStore(service.clock)
        self.templates = _environment()
        self.limit = service.settings.api.max_body
        self.deadline = service.settings.api.body_timeout.total_seconds()

    # ------------------------------------------------------------------ plumbing

    def render(self, request: Request, template: str, status: int = 200,
               session: Session | None = None, **values: Any) -> HTMLResponse:
        now = self.service.clock.now()
        warn = max(self.service.settings.alerts.thresholds, default=timedelta(days=30))
        html = self.templates.get_template(template).render(
            request=request, session=session, now=now,
            relative=lambda at: relative(at, now),
            # Within the first alert threshold: shown as a warning.
            soon=lambda at: at is not None and utc(at) - now <= warn,
            flashes=session.take_flashes() if session is not None else [],
            organisation=self.service.settings.keyd.organisation,
            mode=self.service.settings.keyd.mode.value, **values,
        )
        return HTMLResponse(html, status_code=status)

    def error(self, request: Request, status: int, message: str,
              session: Session | None = None) -> HTMLResponse:
        return self.render(request, "error.html", status, session, message=message)

    def audit_refusal(self, actor: str, action: str, reason: str) -> None:
        try:
            self.service.audit.record(AuditEvent(actor=actor, action=action, outcome="refused",
                                                 detail={"reason": reason[:200]}))
        except KeydError:
            pass  # the refusal stands whether or not it could be recorded

    def page(self, work: Callable[[Request, Session, Caller], Awaitable[Response]]
             ) -> Handler:
        """A page for a signed-in admin; anyone else goes to the sign-in form."""

        async def handle(request: Request) -> Response:
            try:
                signed_in = await run_in_threadpool(self._signed_in, request)
            except KeydError as e:  # the store is down: say so, as the API would
                return self.error(request, e.status, e.detail)
            if signed_in is None:
                return RedirectResponse("/console/sign-in", status_code=303)
            session, caller = signed_in
            try:
                return await work(request, session, caller)
            except KeydError as e:
                return self.error(request, e.status, e.detail, session)

        return handle

    def action(self, fields: set[str],
               work: Callable[[Request, Session, Caller, dict[str, str | bytes]],
                              Awaitable[Response]]) -> Handler:
        """A state-changing POST: session, origin and CSRF token checked first."""

        async def handle(request: Request) -> Response:
            try:
                signed_in = await run_in_threadpool(self._signed_in, request)
            except KeydError as e:
                return self.error(request, e.status, e.detail)
            if signed_in is None:
                return self.error(request, 401, "Your session has ended. Sign in again.")
            session, caller = signed_in
            try:
                if not web.same_origin(request):
                    raise Forbidden("this form was not sent from the console's own pages")
                form = await web.read_form(request, fields | {"csrf"}, limit=self.limit,
                                           deadline=self.deadline)
                csrf = form.get("csrf")
                if not isinstance(csrf, str) or not same_secret(csrf, session.csrf):
                    raise Forbidden("the form's CSRF token is missing or wrong; reload the page")
            except KeydError as e:
                await run_in_threadpool(self.audit_refusal, caller.name,
                                        f"console.{request.url.path.rsplit('/', 1)[-1]}",
                                        e.detail)
                return self.error(request, e.status, e.detail, session)
            try:
                return await work(request, session, caller, form)
            except KeydError as e:
                return self.error(request, e.status, e.detail, session)

        return handle

    def _signed_in(self, request: Request) -> tuple[Session, Caller] | None:
        cookie = request.cookies.get(web.cookie_name(request, SESSION_COOKIE))
        session = self.sessions.get(cookie)
        if session is None:
            return None
        try:
            caller = self.service.caller_named(session.client)
            caller.policy.require(Operation.ADMIN)
        except (Unauthorized, Forbidden):
            # Revoked, or no longer an admin, since signing in: the session ends.
            self.sessions.end(cookie)
            return None
        return session, caller

    # ------------------------------------------------------------------ sign-in

    async def sign_in_form(self, request: Request) -> Response:
        token = web.new_token()
        response = self.render(request, "sign_in.html", signin_csrf=token)
        response.headers.append("set-cookie", web.cookie_header(request, SIGNIN_COOKIE, token,
                                                                600))
        return response

    async def sign_in(self, request: Request) -> Response:
        try:
            if not web.same_origin(request):
                raise Forbidden("this form was not sent from the console's own pages")
            form = await web.read_form(request, {"token", "csrf"}, limit=8192,
                                       deadline=self.deadline)
            expected = request.cookies.get(web.cookie_name(request, SIGNIN_COOKIE), "")
            given = form.get("csrf")
            if not expected or not isinstance(given, str) or not same_secret(given, expected):
                raise Forbidden("the sign-in form expired or was not ours; reload it")
            token = web.text_field(form, "token", limit=200)
        except KeydError as e:
            await run_in_threadpool(self.audit_refusal, "unauthenticated", "console.sign_in",
                                    e.detail)
            return self.error(request, e.status, e.detail)

        def check() -> Caller:
            try:
                caller = self.service.authenticate(token)
            except Unauthorized as e:
                self.audit_refusal("unauthenticated", "console.sign_in", e.detail)
                raise
            try:
                caller.policy.require(Operation.ADMIN)
            except Forbidden as e:
                self.audit_refusal(caller.name, "console.sign_in", e.detail)
                raise Forbidden(f"client {caller.name!r} is not an admin: the console needs "
                                f"a token of the admin policy") from None
            self.service.audit.record(AuditEvent(actor=caller.name, action="console.sign_in"))
            return caller

        try:
            caller = await run_in_threadpool(check)
        except KeydError as e:
            return self.render(request, "sign_in.html", e.status, problem=e.detail,
                               signin_csrf=expected)
        session_id, session = self.sessions.create(caller.name)
        session.flash(f"Signed in as {caller.name}.")
        response = RedirectResponse("/console/", status_code=303)
        response.headers.append("set-cookie", web.cookie_header(request, SESSION_COOKIE,
                                                                session_id, None))
        response.headers.append("set-cookie", web.cookie_header(request, SIGNIN_COOKIE, "", 0))
        return response

    async def sign_out(self, request: Request, session: Session, caller: Caller,
                       form: dict[str, str | bytes]) -> Response:
        self.sessions.end(request.cookies.get(web.cookie_name(request, SESSION_COOKIE)))
        await run_in_threadpool(self.service.audit.record,
                                AuditEvent(actor=caller.name, action="console.sign_out"))
        response = self.render(request, "signed_out.html")
        response.headers.append("set-cookie", web.cookie_header(request, SESSION_COOKIE, "", 0))
        return response

    # ------------------------------------------------------------------ pages

    async def overview(self, request: Request, session: Session, caller: Caller) -> Response:
        def read() -> dict[str, Any]:
            rows = views.key_rows(self.service)
            return {
                "purposes": views.overview(self.service, rows),
                "ready": views.readiness(self.service),
                "alerts": views.recent_alerts(self.service),
                "published": views.published_kids(self.service),
            }

        return self.render(request, "overview.html", session=session, caller=caller,
                           **await run_in_threadpool(read))

    async def timeline_page(self, request: Request, session: Session,
                            caller: Caller) -> Response:
        text = request.query_params.get("days", "")
        if text and (not text.isdigit() or int(text) not in timeline.WINDOWS):
            raise BadRequest(f"days must be one of {list(timeline.WINDOWS)}")
        days = int(text) if text else None
        rows = await run_in_threadpool(views.key_rows, self.service)
        drawing = timeline.build(rows, self.service.clock.now(),
                                 self.service.settings.alerts.thresholds, days)
        return self.render(request, "timeline.html", session=session, caller=caller,
                           timeline=drawing, days=days, windows=timeline.WINDOWS)

    async def counterparties(self, request: Request, session: Session,
                             caller: Caller) -> Response:
        issuers = await run_in_threadpool(views.issuers, self.service)
        return self.render(request, "counterparties.html", session=session, caller=caller,
                           issuers=issuers)

    async def audit(self, request: Request, session: Session, caller: Caller) -> Response:
        query = request.query_params
        unknown = set(query) - {"actor", "action", "kid", "since", "until", "before"}
        if unknown:
            raise BadRequest(f"unknown filter {sorted(unknown)[0][:40]!r}")
        filters = {k: query.get(k, "").strip()[:256] for k in ("actor", "action", "kid")}
        since = _parse_time(query.get("since", ""), "since")
        until = _parse_time(query.get("until", ""), "until")
        before_text = query.get("before", "")
        if before_text and not before_text.isdigit():
            raise BadRequest("before must be an event number")
        before = int(before_text) if before_text else None

        def read() -> dict[str, Any]:
            events = self.service.audit.page(
                before=before, since=since, until=until, limit=AUDIT_PAGE + 1,
                **{k: v or None for k, v in filters.items()},
            )
            newest = self.service.audit.page(limit=1)
            broken = self.service.audit.verify()
            return {"events": events[:AUDIT_PAGE], "more": len(events) > AUDIT_PAGE,
                    "head": newest[0] if newest else None, "broken": broken}

        data = await run_in_threadpool(read)
        older = None
        if data["more"]:
            params = {**filters, "since": query.get("since", ""), "until": query.get("until", ""),
                      "before": str(data["events"][-1].seq)}
            older = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items() if v)
        return self.render(request, "audit.html", session=session, caller=caller,
                           filters=filters, since=query.get("since", ""),
                           until=query.get("until", ""), older=older, **data)

    async def clients(self, request: Request, session: Session, caller: Caller) -> Response:
        rows = await run_in_threadpool(views.clients, self.service)
        return self.render(request, "clients.html", session=session, caller=caller,
                           clients=rows, policies=sorted(self.service.policies))

    async def confirm_rotate(self, request: Request, session: Session,
                             caller: Caller) -> Response:
        purpose = _purpose(request.path_params["purpose"])
        life = self.service.settings.lifecycle[purpose]
        return self.render(request, "rotate.html", session=session, caller=caller,
                           purpose=purpose, prepublish=life.prepublish, overlap=life.overlap)

    async def confirm_revoke(self, request: Request, session: Session,
                             caller: Caller) -> Response:
        key = await run_in_threadpool(self._key_row, request.path_params["kid"])
        return self.render(request, "revoke.html", session=session, caller=caller, key=key)

    async def certificate_form(self, request: Request, session: Session,
                               caller: Caller) -> Response:
        key = await run_in_threadpool(self._key_row, request.path_params["kid"])
        return self.render(request, "certificate.html", session=session, caller=caller,
                           key=key, assigned=self.service.settings.keyd.kid.value == "assigned")

    async def confirm_revoke_client(self, request: Request, session: Session,
                                    caller: Caller) -> Response:
        name = request.path_params["name"]
        rows = await run_in_threadpool(views.clients, self.service)
        client = next((r.info for r in rows if r.info.name == name), None)
        if client is None:
            return self.error(request, 404, f"no client {name[:64]!r}", session)
        return self.render(request, "revoke_client.html", session=session, caller=caller,
                           client=client, myself=client.name == caller.name)

    def _key_row(self, kid: str) -> views.KeyRow:
        for row in views.key_rows(self.service):
            if kid in (row.kid, row.id):
                return row
        raise NotFound(f"no key with kid or id {kid[:80]!r}")

    # ------------------------------------------------------------------ actions

    async def rotate(self, request: Request, session: Session, caller: Caller,
                     form: dict[str, str | bytes]) -> Response:
        purpose = _purpose(request.path_params["purpose"])
        now = web.text_field(form, "now", required=False) == "yes"
        info = await run_in_threadpool(lambda: self.service.rotate(purpose, actor=caller.name,
                                                                   now=now))
        session.flash(f"Rotation of the {purpose.value} key started: key {info.kid or info.id} "
                      f"is {info.state.value.replace('_', ' ')}.")
        return RedirectResponse("/console/", status_code=303)

    async def revoke(self, request: Request, session: Session, caller: Caller,
                     form: dict[str, str | bytes]) -> Response:
        kid = request.path_params["kid"]
        reason = web.text_field(form, "reason", limit=256)
        revoked, replacement = await run_in_threadpool(
            lambda: self.service.revoke(kid, reason=reason, actor=caller.name))
        message = f"Revoked {revoked.purpose.value} key {revoked.kid or revoked.id}."
        if replacement is not None:
            message += (f" Key {replacement.kid or replacement.id} is now "
                        f"{replacement.state.value.replace('_', ' ')}.")
        session.flash(message)
        return RedirectResponse("/console/", status_code=303)

    async def csr(self, request: Request, session: Session, caller: Caller,
                  form: dict[str, str | bytes]) -> Response:
        kid = request.path_params["kid"]
        pem = await run_in_threadpool(lambda: self.service.csr(kid, actor=caller.name))
        filename = _SAFE_NAME.sub("_", kid)[:80] + ".csr.pem"
        return Response(pem, media_type="application/pkcs10", headers={
            "Content-Disposition": f'attachment; filename="{filename}"'})

    async def upload_certificate(self, request: Request, session: Session, caller: Caller,
                                 form: dict[str, str | bytes]) -> Response:
        kid = request.path_params["kid"]
        file = form.get("file")
        pasted = web.text_field(form, "pem", required=False, limit=self.limit)
        if isinstance(file, bytes) and pasted:
            raise BadRequest("give the certificate as a file or pasted, not both")
        data = file if isinstance(file, bytes) else pasted.encode()
        if not data:
            raise BadRequest("choose a certificate file (PEM, leaf first) or paste one")
        assigned = web.text_field(form, "kid", required=False, limit=128) or None
        info, warnings = await run_in_threadpool(
            lambda: self.service.import_certificate(kid, data, actor=caller.name,
                                                    assigned_kid=assigned))
        session.flash(f"Certificate imported for {info.purpose.value} key {info.kid}: "
                      f"it is {info.state.value.replace('_', ' ')}.")
        for warning in warnings:
            session.flash(f"Warning: {warning}")
        return RedirectResponse("/console/", status_code=303)

    async def add_client(self, request: Request, session: Session, caller: Caller,
                         form: dict[str, str | bytes]) -> Response:
        name = web.text_field(form, "name", limit=64)
        policy = web.text_field(form, "policy", limit=64)
        token = await run_in_threadpool(
            lambda: self.service.add_client(name, policy, actor=caller.name))
        # Shown once, on this response only (no-store): keyd keeps just its hash.
        return self.render(request, "client_added.html", session=session, caller=caller,
                           name=name, policy=policy, token=token)

    async def revoke_client(self, request: Request, session: Session, caller: Caller,
                            form: dict[str, str | bytes]) -> Response:
        name = request.path_params["name"]
        await run_in_threadpool(lambda: self.service.revoke_client(name, actor=caller.name))
        self.sessions.end_client(name)
        if name == caller.name:
            return RedirectResponse("/console/sign-in", status_code=303)
        session.flash(f"Client {name} is revoked: its token is refused from now on.")
        return RedirectResponse("/console/clients", status_code=303)


def _purpose(value: str) -> Purpose:
    try:
        return Purpose(value)
    except ValueError:
        raise BadRequest(f"no purpose {value[:40]!r}") from None


def _parse_time(value: str, name: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be a date or time like 2026-11-30T10:00") from None
    # A time without an offset is UTC, as every time on these pages is.
    return utc(parsed) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def create_console(service: KeyService) -> web.SecurityHeaders:
    """The console as an ASGI app, to be mounted at /console."""
    console = Console(service)
    page, action = console.page, console.action
    static = StaticFiles(directory=str(resources.files("keyd.console") / "static"))
    routes = [
        Route("/", page(console.overview), methods=["GET"]),
        Route("/sign-in", console.sign_in_form, methods=["GET"]),
        Route("/sign-in", console.sign_in, methods=["POST"]),
        Route("/sign-out", action(set(), console.sign_out), methods=["POST"]),
        Route("/timeline", page(console.timeline_page), methods=["GET"]),
        Route("/counterparties", page(console.counterparties), methods=["GET"]),
        Route("/audit", page(console.audit), methods=["GET"]),
        Route("/clients", page(console.clients), methods=["GET"]),
        Route("/clients", action({"name", "policy"}, console.add_client), methods=["POST"]),
        Route("/clients/{name}/revoke", page(console.confirm_revoke_client), methods=["GET"]),
        Route("/clients/{name}/revoke", action(set(), console.revoke_client), methods=["POST"]),
        Route("/keys/{purpose}/rotate", page(console.confirm_rotate), methods=["GET"]),
        Route("/keys/{purpose}/rotate", action({"now"}, console.rotate), methods=["POST"]),
        Route("/keys/{kid}/revoke", page(console.confirm_revoke), methods=["GET"]),
        Route("/keys/{kid}/revoke", action({"reason"}, console.revoke), methods=["POST"]),
        Route("/keys/{kid}/csr", action(set(), console.csr), methods=["POST"]),
        Route("/keys/{kid}/certificate", page(console.certificate_form), methods=["GET"]),
        Route("/keys/{kid}/certificate", action({"file", "pem", "kid"},
                                                console.upload_certificate), methods=["POST"]),
        Mount("/static", app=static),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return console.error(request, 404, "There is no such console page.")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return console.error(request, 405, "That page does not take this method.")

    async def failed(request: Request, exc: Exception) -> Response:
        # A bug, not an input problem: its type is logged (never request data),
        # the page says nothing internal.
        log.error("console %s %s failed: %s", request.method, request.url.path,
                  type(exc).__name__, exc_info=exc)
        return console.error(request, 500, "keyd failed to handle this request.")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed,
                                                       Exception: failed})
    return web.SecurityHeaders(app)
