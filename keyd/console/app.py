"""The admin console at /console: pages and actions for security admins.

Sign-in takes an admin bearer token once and gives a session cookie; every
later request is checked against that client again (still there, still
admin).  Every form that changes something carries the session's CSRF token
and must come from our own origin.  Every action goes through KeyService
under the signed-in client's name, so the audit log says who did it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from keyd.audit import AuditEvent
from keyd.clock import utc
from keyd.console import actions, pages, web
from keyd.console.render import environment, relative
from keyd.console.web import same_secret
from keyd.errors import Forbidden, KeydError, Unauthorized
from keyd.policy import Operation
from keyd.service import Caller, KeyService
from keyd.store.sessions import FILE_NAME as SESSIONS_FILE
from keyd.store.sessions import Session, SessionStore

log = logging.getLogger("keyd.console")

SESSION_COOKIE = "keyd-console"
SIGNIN_COOKIE = "keyd-console-signin"  # the sign-in form's own CSRF token (double submit)
Handler = Callable[[Request], Awaitable[Response]]


class Console:
    def __init__(self, service: KeyService) -> None:
        self.service = service
        self.sessions = SessionStore(
            service.clock, service.settings.keyd.data_dir / SESSIONS_FILE)
        self.templates = environment()
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
            self.service.record(AuditEvent(actor=actor, action=action, outcome="refused",
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
            self.service.record(AuditEvent(actor=caller.name, action="console.sign_in"))
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
        await run_in_threadpool(self.service.record,
                                AuditEvent(actor=caller.name, action="console.sign_out"))
        response = self.render(request, "signed_out.html")
        response.headers.append("set-cookie", web.cookie_header(request, SESSION_COOKIE, "", 0))
        return response


def create_console(service: KeyService) -> web.SecurityHeaders:
    """The console as an ASGI app, to be mounted at /console."""
    console = Console(service)
    def get(path: str, handler: Callable[..., Awaitable[Response]]) -> Route:
        return Route(path, console.page(partial(handler, console)), methods=["GET"])

    def post(path: str, fields: set[str], handler: Callable[..., Awaitable[Response]]) -> Route:
        return Route(path, console.action(fields, partial(handler, console)), methods=["POST"])

    routes = [
        Route("/sign-in", console.sign_in_form, methods=["GET"]),
        Route("/sign-in", console.sign_in, methods=["POST"]),
        Route("/sign-out", console.action(set(), console.sign_out), methods=["POST"]),
        get("/", pages.overview),
        get("/timeline", pages.timeline_page),
        get("/counterparties", pages.counterparties),
        get("/audit", pages.audit),
        get("/clients", pages.clients),
        post("/clients", {"name", "policy"}, actions.add_client),
        get("/clients/{name}/revoke", pages.confirm_revoke_client),
        post("/clients/{name}/revoke", set(), actions.revoke_client),
        get("/keys/{purpose}/rotate", pages.confirm_rotate),
        post("/keys/{purpose}/rotate", {"now"}, actions.rotate),
        get("/keys/{kid}/revoke", pages.confirm_revoke),
        post("/keys/{kid}/revoke", {"reason"}, actions.revoke),
        post("/keys/{kid}/csr", set(), actions.csr),
        get("/keys/{kid}/certificate", pages.certificate_form),
        post("/keys/{kid}/certificate", {"file", "pem", "kid"}, actions.upload_certificate),
        Mount("/static", app=StaticFiles(directory=str(resources.files("keyd.console") /
                                                       "static"))),
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
