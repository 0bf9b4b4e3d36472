"""The console's actions: each a POST whose session, origin and CSRF token
app.py has checked, each carried out by KeyService under the signed-in client's
name (so the audit log says who did it), then post-redirect-get."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from keyd.console import web
from keyd.console.pages import purpose_of
from keyd.errors import BadRequest
from keyd.service import Caller
from keyd.store.sessions import Session

if TYPE_CHECKING:
    from keyd.console.app import Console

Form = dict[str, str | bytes]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


async def rotate(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    purpose = purpose_of(request.path_params["purpose"])
    now = web.text_field(form, "now", required=False) == "yes"
    info = await run_in_threadpool(lambda: console.service.rotate(purpose, actor=caller.name,
                                                                  now=now))
    session.flash(f"Rotation of the {purpose.value} key started: key {info.kid or info.id} "
                  f"is {info.state.value.replace('_', ' ')}.")
    return RedirectResponse("/console/", status_code=303)


async def revoke(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    kid = request.path_params["kid"]
    reason = web.text_field(form, "reason", limit=256)
    revoked, replacement = await run_in_threadpool(
        lambda: console.service.revoke(kid, reason=reason, actor=caller.name))
    message = f"Revoked {revoked.purpose.value} key {revoked.kid or revoked.id}."
    if replacement is not None:
        message += (f" Key {replacement.kid or replacement.id} is now "
                    f"{replacement.state.value.replace('_', ' ')}.")
    session.flash(message)
    return RedirectResponse("/console/", status_code=303)


async def csr(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    kid = request.path_params["kid"]
    pem = await run_in_threadpool(lambda: console.service.csr(kid, actor=caller.name))
    filename = _SAFE_NAME.sub("_", kid)[:80] + ".csr.pem"
    return Response(pem, media_type="application/pkcs10", headers={
                    "Content-Disposition": f'attachment; filename="{filename}"'})


async def upload_certificate(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    kid = request.path_params["kid"]
    file = form.get("file")
    pasted = web.text_field(form, "pem", required=False, limit=console.limit)
    if isinstance(file, bytes) and pasted:
        raise BadRequest("give the certificate as a file or pasted, not both")
    data = file if isinstance(file, bytes) else pasted.encode()
    if not data:
        raise BadRequest("choose a certificate file (PEM, leaf first) or paste one")
    assigned = web.text_field(form, "kid", required=False, limit=128) or None
    info, warnings = await run_in_threadpool(
        lambda: console.service.import_certificate(kid, data, actor=caller.name,
                                                assigned_kid=assigned))
    session.flash(f"Certificate imported for {info.purpose.value} key {info.kid}: "
                  f"it is {info.state.value.replace('_', ' ')}.")
    for warning in warnings:
        session.flash(f"Warning: {warning}")
    return RedirectResponse("/console/", status_code=303)


async def add_client(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    name = web.text_field(form, "name", limit=64)
    policy = web.text_field(form, "policy", limit=64)
    token = await run_in_threadpool(
        lambda: console.service.add_client(name, policy, actor=caller.name))
    # Shown once, on this response only (no-store): keyd keeps just its hash.
    return console.render(request, "client_added.html", session=session, caller=caller,
                          name=name, policy=policy, token=token)


async def revoke_client(
    console: Console, request: Request, session: Session, caller: Caller, form: Form
) -> Response:
    name = request.path_params["name"]
    await run_in_threadpool(lambda: console.service.revoke_client(name, actor=caller.name))
    console.sessions.end_client(name)
    if name == caller.name:
        return RedirectResponse("/console/sign-in", status_code=303)
    session.flash(f"Client {name} is revoked: its token is refused from now on.")
    return RedirectResponse("/console/clients", status_code=303)
