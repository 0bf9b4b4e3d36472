"""The console's pages: reads for a signed-in admin, rendered from templates/."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from keyd.audit import EventFilter
from keyd.clock import utc
from keyd.console import timeline, views
from keyd.errors import BadRequest, NotFound
from keyd.model import Purpose
from keyd.service import Caller
from keyd.store.sessions import Session

if TYPE_CHECKING:
    from keyd.console.app import Console

AUDIT_PAGE = 50


async def overview(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    def read() -> dict[str, Any]:
        rows = views.key_rows(console.service)
        return {
            "purposes": views.overview(console.service, rows),
            "ready": views.readiness(console.service),
            "alerts": views.recent_alerts(console.service),
            "published": views.published_kids(console.service),
        }

    return console.render(request, "overview.html", session=session, caller=caller,
                          **await run_in_threadpool(read))


async def timeline_page(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    text = request.query_params.get("days", "")
    if text and (not text.isdigit() or int(text) not in timeline.WINDOWS):
        raise BadRequest(f"days must be one of {list(timeline.WINDOWS)}")
    days = int(text) if text else None
    rows = await run_in_threadpool(views.key_rows, console.service)
    drawing = timeline.build(rows, console.service.clock.now(),
                             console.service.settings.alerts.thresholds, days)
    return console.render(request, "timeline.html", session=session, caller=caller,
                          timeline=drawing, days=days, windows=timeline.WINDOWS)


async def counterparties(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    issuers = await run_in_threadpool(views.issuers, console.service)
    return console.render(request, "counterparties.html", session=session, caller=caller,
                          issuers=issuers)


async def audit(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    query = request.query_params
    unknown = set(query) - {"actor", "action", "kid", "since", "until", "before"}
    if unknown:
        raise BadRequest(f"unknown filter {sorted(unknown)[0][:40]!r}")
    filters = {k: query.get(k, "").strip()[:256] for k in ("actor", "action", "kid")}
    since = _parse_time(query.get("since", ""), "since")
    until = _parse_time(query.get("until", ""), "until")
    # An event: "SEQ@SEGMENT" (a segment is a replica's host:pid).
    seq_text, _, segment = query.get("before", "").partition("@")
    if (seq_text or segment) and not (seq_text.isdigit() and segment):
        raise BadRequest("before must be an event (SEQ@SEGMENT)")
    before = (segment, int(seq_text)) if seq_text else None

    def read() -> dict[str, Any]:
        where = EventFilter(since=since, until=until, **{k: v or None for k, v in filters.items()})
        events = console.service.audit_page(where, before=before, limit=AUDIT_PAGE + 1)
        length, digest = console.service.audit_head()
        broken = console.service.audit_verify()
        return {"events": events[:AUDIT_PAGE], "more": len(events) > AUDIT_PAGE,
                "head": f"{length}:{digest}" if length else None, "broken": broken}

    data = await run_in_threadpool(read)
    older = None
    if data["more"]:
        params = {**filters, "since": query.get("since", ""), "until": query.get("until", ""),
                  "before": "{0.seq}@{0.segment}".format(data["events"][-1])}
        older = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items() if v)
    return console.render(request, "audit.html", session=session, caller=caller,
                          filters=filters, since=query.get("since", ""),
                          until=query.get("until", ""), older=older, **data)


async def clients(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    rows = await run_in_threadpool(views.clients, console.service)
    return console.render(request, "clients.html", session=session, caller=caller,
                          clients=rows, policies=sorted(console.service.policies))


async def confirm_rotate(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    purpose = purpose_of(request.path_params["purpose"])
    life = console.service.settings.lifecycle[purpose]
    return console.render(request, "rotate.html", session=session, caller=caller,
                          purpose=purpose, prepublish=life.prepublish, overlap=life.overlap)


async def confirm_revoke(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    key = await run_in_threadpool(_key_row, console, request.path_params["kid"])
    return console.render(request, "revoke.html", session=session, caller=caller, key=key)


async def certificate_form(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    key = await run_in_threadpool(_key_row, console, request.path_params["kid"])
    return console.render(request, "certificate.html", session=session, caller=caller,
                          key=key, assigned=console.service.settings.keyd.kid.value == "assigned")


async def confirm_revoke_client(
    console: Console, request: Request, session: Session, caller: Caller
) -> Response:
    name = request.path_params["name"]
    rows = await run_in_threadpool(views.clients, console.service)
    client = next((r.info for r in rows if r.info.name == name), None)
    if client is None:
        return console.error(request, 404, f"no client {name[:64]!r}", session)
    return console.render(request, "revoke_client.html", session=session, caller=caller,
                          client=client, myself=client.name == caller.name)


def _key_row(console: Console, kid: str) -> views.KeyRow:
    for row in views.key_rows(console.service):
        if kid in (row.kid, row.id):
            return row
    raise NotFound(f"no key with kid or id {kid[:80]!r}")


def purpose_of(value: str) -> Purpose:
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
