"""The admin console over plain HTTP against the real daemon: headers, cookies,
sign-in refusals, CSRF and origin checks, strict forms, sessions that end,
audit paging.  (tests/test_console_browser.py drives the same pages in chromium.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from keyd.console.web import CSP
from tests.certs import ca_sign
from tests.daemon import REPO, Daemon, keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

PAGES = ["/console/", "/console/timeline", "/console/timeline?days=30",
         "/console/counterparties", "/console/audit", "/console/clients",
         "/console/keys/signing/rotate"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("console-http"),
                 {"lifecycle.transport": {"enabled": False}}) as d:
        yield d


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


@contextmanager
def signed_in(daemon: Daemon, token: str | None = None) -> Iterator[httpx.Client]:
    """A client holding a console session (and the page's CSRF token in its x-csrf header,
    which keyd ignores: the tests read it from there)."""
    with httpx.Client(base_url=daemon.api_url, timeout=30) as client:
        form = client.get("/console/sign-in")
        answer = client.post("/console/sign-in", data={"csrf": csrf_of(form.text),
                                                       "token": token or daemon.admin_token})
        assert answer.status_code == 303, answer.text
        client.headers["x-csrf"] = csrf_of(client.get("/console/").text)
        yield client


def audit_events(daemon: Daemon, action: str) -> list[dict[str, object]]:
    out = keyd(daemon.config, "audit", "--json", "--action", action, "--limit", "500").stdout
    events: list[dict[str, object]] = json.loads(out)
    return events


class Links(HTMLParser):
    """Every URL a page would load or link, inline scripts and style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href", "action", "formaction"):
            if values.get(name) is not None:
                self.urls.append(str(values[name]))
        if "style" in values or tag == "style":
            self.inline.append(f"style on <{tag}>")
        if tag == "script" and not values.get("src"):
            self.inline.append("inline <script>")
        if any(name.startswith("on") for name in values):
            self.inline.append(f"event handler on <{tag}>")


def test_every_console_response_carries_the_security_headers(daemon: Daemon) -> None:
    with signed_in(daemon) as client:
        answers = [client.get(p) for p in PAGES]
        answers += [client.get("/console/static/console.css"), client.get("/console/nowhere"),
                    httpx.get(daemon.api_url + "/console/sign-in"),
                    httpx.get(daemon.api_url + "/console/")]
    for answer in answers:
        assert answer.headers["content-security-policy"] == CSP, answer.url
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert answers[-1].status_code == 303  # not signed in: to the sign-in form


def test_pages_load_nothing_from_elsewhere_and_hold_no_inline_script_or_style(
    daemon: Daemon,
) -> None:
    with signed_in(daemon) as client:
        for path in [*PAGES, "/console/sign-in"]:
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
            links = Links()
            links.feed(answer.text)
            assert links.inline == [], path
            foreign = [u for u in links.urls if not u.startswith(("/", "#", "?"))]
            assert foreign == [], path


def test_the_session_cookie_is_httponly_strict_and_scoped_to_the_console(
    daemon: Daemon,
) -> None:
    with httpx.Client(base_url=daemon.api_url) as client:
        form = client.get("/console/sign-in")
        answer = client.post("/console/sign-in", data={"csrf": csrf_of(form.text),
                                                       "token": daemon.admin_token})
    cookie = next(c for c in answer.headers.get_list("set-cookie")
                  if c.startswith("keyd-console="))
    attributes = {a.strip().split("=")[0] for a in cookie.split(";")[1:]}
    assert {"HttpOnly", "SameSite", "Path"} <= attributes
    assert "SameSite=Strict" in cookie and "Path=/console" in cookie
    # Plain loopback HTTP: a Secure (or __Host-) cookie would never come back.
    assert "Secure" not in attributes and "Max-Age" not in attributes


def test_sign_in_refuses_a_service_token_and_a_wrong_one_and_audits_both(
    daemon: Daemon,
) -> None:
    for token, status in ((daemon.service_token, 403), ("keyd_wrong", 401)):
        with httpx.Client(base_url=daemon.api_url) as client:
            form = client.get("/console/sign-in")
            answer = client.post("/console/sign-in", data={"csrf": csrf_of(form.text),
                                                           "token": token})
            assert answer.status_code == status
            assert not any(c.startswith("keyd-console=")
                           for c in answer.headers.get_list("set-cookie"))
            assert client.get("/console/").status_code == 303
    refused = [e for e in audit_events(daemon, "console.sign_in") if e["outcome"] == "refused"]
    assert {"svc-1", "unauthenticated"} <= {str(e["actor"]) for e in refused}


def test_the_sign_in_form_needs_its_own_csrf_token(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.api_url) as client:
        answer = client.post("/console/sign-in", data={"csrf": "guess",
                                                       "token": daemon.admin_token})
    assert answer.status_code == 403
    assert not answer.headers.get_list("set-cookie")


def test_a_form_from_another_origin_is_refused_even_with_the_right_token(
    daemon: Daemon,
) -> None:
    with signed_in(daemon) as client:
        before = client.get("/console/").text.count('class="kid"')
        for headers in ({"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}):
            answer = client.post("/console/keys/encryption/rotate",
                                 data={"csrf": client.headers["x-csrf"]}, headers=headers)
            assert answer.status_code == 403
        assert client.get("/console/").text.count('class="kid"') == before


def test_forms_are_strict_about_fields_types_and_size(daemon: Daemon) -> None:
    with signed_in(daemon) as client:
        csrf = client.headers["x-csrf"]
        unknown = client.post("/console/keys/signing/rotate", data={"csrf": csrf, "evil": "1"})
        assert unknown.status_code == 400 and "evil" in unknown.text
        twice = client.post("/console/keys/signing/rotate",
                            content=f"csrf={csrf}&csrf={csrf}",
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert twice.status_code == 400
        as_json = client.post("/console/keys/signing/rotate", json={"csrf": csrf})
        assert as_json.status_code == 415
        huge = client.post("/console/clients", data={"csrf": csrf, "name": "x" * 300_000,
                                                     "policy": "service"})
        assert huge.status_code == 413
        wrong_window = client.get("/console/timeline?days=13")
        assert wrong_window.status_code == 400
        bad_time = client.get("/console/audit?since=yesterday")
        assert bad_time.status_code == 400 and "since" in bad_time.text


def test_revoking_a_client_ends_its_console_sessions_at_once(daemon: Daemon) -> None:
    token = keyd(daemon.config, "client", "add", "admin-2", "--policy", "admin").stdout.strip()
    with signed_in(daemon, token) as second, signed_in(daemon) as first:
        assert second.get("/console/").status_code == 200
        answer = first.post("/console/clients/admin-2/revoke",
                            data={"csrf": first.headers["x-csrf"]})
        assert answer.status_code == 303
        assert second.get("/console/").status_code == 303  # back to sign-in
        with daemon.client(token) as api:
            assert api.get("/v1/keys").status_code == 401
    revoked = audit_events(daemon, "client.revoke")
    assert any(e["actor"] == "admin-1" and e["detail"] == {"client": "admin-2",
                                                           "policy": "admin"} for e in revoked)


def test_signing_out_ends_the_session(daemon: Daemon) -> None:
    with signed_in(daemon) as client:
        cookie = client.cookies["keyd-console"]
        answer = client.post("/console/sign-out", data={"csrf": client.headers["x-csrf"]})
        assert answer.status_code == 200 and "Signed out" in answer.text
        replay = httpx.get(daemon.api_url + "/console/", cookies={"keyd-console": cookie})
        assert replay.status_code == 303


def test_the_audit_page_is_paged_and_filtered(daemon: Daemon) -> None:
    with signed_in(daemon) as client:
        with daemon.client(daemon.admin_token) as api:
            kid = next(k["kid"] for k in api.get("/v1/keys").json()["keys"]
                       if k["purpose"] == "encryption" and k["state"] == "active")
        for _ in range(55):  # each CSR download is an audited action
            answer = client.post(f"/console/keys/{kid}/csr",
                                 data={"csrf": client.headers["x-csrf"]})
            assert answer.status_code == 200
            assert answer.text.startswith("-----BEGIN CERTIFICATE REQUEST-----")
        first = client.get(f"/console/audit?action=key.csr&kid={kid}")
        rows = re.findall(r"<td><code>key\.csr</code></td>", first.text)
        assert len(rows) == 50
        older = re.search(r'href="/console/audit\?([^"]+)">Older events', first.text)
        assert older, "no link to older events"
        second = client.get("/console/audit?" + older.group(1).replace("&amp;", "&"))
        assert len(re.findall(r"<td><code>key\.csr</code></td>", second.text)) >= 5
        assert "Older events" not in second.text
        assert "Chain: intact" in first.text
        head = re.search(r'class="head">(\d+):([0-9a-f]{64})<', first.text)
        assert head, "no chain head shown"
        nothing = client.get("/console/audit?actor=nobody-at-all")
        assert "No event matches." in nothing.text


def test_the_console_is_not_served_on_the_public_listener(daemon: Daemon) -> None:
    with daemon.public() as public:
        assert public.get("/console/").status_code == 404
        assert public.get("/console/sign-in").status_code == 404


def test_the_wheel_carries_the_console_templates_and_static_files(tmp_path: Path) -> None:
    """Built from a copy of the source (the checkout stays clean), whatever the
    packaging config: every file the console serves is in the wheel."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    for folder in ("keyd", "migrations", "policies"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("keyd-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    console = REPO / "keyd" / "console"
    served = {f"keyd/console/{p.relative_to(console)}" for d in ("templates", "static")
              for p in (console / d).iterdir()}
    assert len(served) > 10
    assert served <= shipped, sorted(served - shipped)
    metadata = next(n for n in shipped if n.endswith("/METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: jinja2" in requires and "Requires-Dist: python-multipart" in requires


def test_production_keys_get_their_certificate_through_the_console(tmp_path: Path) -> None:
    """Production: keys wait for a CA; CSR out, pasted PEM in, and the key is active."""
    with running(tmp_path, {"keyd": {"mode": "production"},
                            "lifecycle.transport": {"enabled": False},
                            "lifecycle.encryption": {"enabled": False}}) as daemon:
        with signed_in(daemon) as client:
            overview = client.get("/console/")
            assert "Awaiting a certificate" in overview.text
            assert "Readiness: not ready" in overview.text
            provisional = re.search(r'<code class="kid">(kv_[0-9a-f]+)</code> <span class="tag">'
                                    r'provisional id', overview.text)
            assert provisional, "no key awaiting its certificate"
            key_id = provisional.group(1)
            csr = client.post(f"/console/keys/{key_id}/csr",
                              data={"csrf": client.headers["x-csrf"]})
            assert csr.headers["content-disposition"] == \
                f'attachment; filename="{key_id}.csr.pem"'
            cert_pem, ca = ca_sign(csr.content)
            both = client.post(f"/console/keys/{key_id}/certificate",
                               data={"csrf": client.headers["x-csrf"], "pem": cert_pem.decode()},
                               files={"file": ("c.pem", cert_pem)})
            assert both.status_code == 400  # a file or a paste, not both
            imported = client.post(f"/console/keys/{key_id}/certificate",
                                   data={"csrf": client.headers["x-csrf"],
                                         "pem": cert_pem.decode()},
                                   files={"file": ("", b"")})
            assert imported.status_code == 303, imported.text
            after = client.get("/console/")
            assert "Readiness: ready" in after.text and f"CN={ca}" in after.text
            assert "Certificate imported for signing key" in after.text
            wrong = client.post(f"/console/keys/{key_id}/certificate",
                                data={"csrf": client.headers["x-csrf"], "pem": "garbage"},
                                files={"file": ("", b"")})
            assert wrong.status_code == 400 and "That did not work" in wrong.text


def test_upload_is_offered_only_where_a_certificate_can_be_imported(daemon: Daemon) -> None:
    """Default kid scheme x5t#S256: a new certificate would change a published kid,
    so a published key gets no upload button (the form still refuses, with why)."""
    with signed_in(daemon) as client:
        overview = client.get("/console/")
        assert "Download CSR" in overview.text and "Upload certificate" not in overview.text
        with daemon.client(daemon.admin_token) as api:
            kid = next(k["kid"] for k in api.get("/v1/keys").json()["keys"]
                       if k["purpose"] == "signing" and k["state"] == "active")
        csr = client.post(f"/console/keys/{kid}/csr", data={"csrf": client.headers["x-csrf"]})
        cert_pem, _ = ca_sign(csr.content)
        refused = client.post(f"/console/keys/{kid}/certificate",
                              data={"csrf": client.headers["x-csrf"],
                                    "pem": cert_pem.decode()})
        assert refused.status_code == 409 and "cannot change" in refused.text


def test_an_emergency_rotation_shows_the_retired_key_and_when_it_is_destroyed(
    daemon: Daemon,
) -> None:
    with signed_in(daemon) as client:
        answer = client.post("/console/keys/encryption/rotate",
                             data={"csrf": client.headers["x-csrf"], "now": "yes"})
        assert answer.status_code == 303
        overview = client.get("/console/")
        assert "is active" in overview.text  # the flash: the new key took over at once
        retired = overview.text.split("Retired (still published, still decrypts)")[1]
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC <time class=\"countdown\" "
                         r"datetime=\"[^\"]+\" data-countdown>\(in (6 d 23 h|7 d 0 h)\)", retired)
    events = audit_events(daemon, "key.retire")
    assert any(e["actor"] == "admin-1" for e in events)
