"""The admin console in a real browser (Debian's chromium via Playwright)
against the real daemon: what an admin does, end to end, and what must be
refused.  Every page is checked with axe-core and kept as a screenshot in
test-artifacts/console/."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwk  # type: ignore[import-untyped]
from playwright.sync_api import Browser, Page, expect

from tests.browser import check_page, chromium, context
from tests.certs import ca_sign, self_signed
from tests.daemon import Daemon, StaticServer, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

HOSTILE_REASON = '<script>alert("reason")</script><b>leaked</b> & more'
SIGN_IN = re.compile(r".*/console/sign-in$")
HOSTILE_NAME = '<img src=x onerror=alert("name")>'


def jwk_with_chain(key: rsa.RSAPrivateKey, kid: str, cert: x509.Certificate) -> dict[str, str]:
    entry = jwk.JWK.from_pyca(key.public_key()).export_public(as_dict=True)
    der = cert.public_bytes(serialization.Encoding.DER)
    return {**entry, "kid": kid, "use": "sig", "alg": "PS256",
            "x5c": [base64.b64encode(der).decode()]}


@pytest.fixture(scope="module")
def issuer() -> Iterator[StaticServer]:
    """A counterparty's JWKS: one sound key whose certificate ends in 5 days, one too weak."""
    now = datetime.now(UTC)
    good = rsa.generate_private_key(65537, 2048)
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the key keyd must drop
    server = StaticServer()
    server.body = json.dumps({"keys": [
        jwk_with_chain(good, "paynet-sig-1", self_signed(good, now, "PayNet test", days=5)),
        {**jwk.JWK.from_pyca(weak.public_key()).export_public(as_dict=True),
         "kid": "paynet-weak", "use": "sig"},
    ]}).encode()
    yield server
    server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, issuer: StaticServer) -> Iterator[Daemon]:
    # rfc7638 kids depend on the key alone, so a CA's certificate can replace
    # the self-signed one on a published key without changing its kid.
    with running(tmp_path_factory.mktemp("console"), {
        "keyd": {"kid": "rfc7638"},
        "issuers.paynet": {"jwks_uri": issuer.url},
    }) as d:
        yield d


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def published(daemon: Daemon) -> set[str]:
    with daemon.public() as public:
        return {k["kid"] for k in public.get("/jwks").json()["keys"]}


def sign_in(page: Page, token: str) -> None:
    page.goto("/console/")
    expect(page).to_have_url(SIGN_IN)
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def active_kid(page: Page, purpose: str) -> str:
    card = page.locator(f"section[aria-labelledby='purpose-{purpose}']")
    return card.locator("dl.facts code.kid").first.inner_text()


def test_an_admin_signs_in_sees_every_kid_rotates_revokes_uploads_and_signs_out(
    daemon: Daemon, browser: Browser, tmp_path: Path
) -> None:
    with context(browser, daemon.api_url) as (ctx, page, watch):
        page.goto("/console/")
        check_page(page, "01-sign-in")
        sign_in(page, daemon.admin_token)
        expect(page.locator(".flash")).to_contain_text("Signed in as admin-1")
        before = published(daemon)
        assert before
        for kid in before:  # every published kid is on the overview
            expect(page.locator("code.kid", has_text=kid).first).to_be_visible()
        expect(page.locator("#readiness")).to_have_text("Readiness: ready")
        # The issuer's certificate ends within the alert thresholds: keyd alerted at start.
        expect(page.locator("section[aria-labelledby='alerts']")).to_contain_text(
            "issuer paynet")
        check_page(page, "02-overview")
        session_cookie = next(c for c in ctx.cookies() if c["name"] == "keyd-console")
        assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"

        # Rotate: a confirmation page, then a new key published ahead of use.
        page.get_by_role("link", name="Rotate the signing key").click()
        check_page(page, "03-rotate-confirm")
        page.get_by_role("button", name="Rotate the signing key").click()
        expect(page.locator(".flash")).to_contain_text("Rotation of the signing key started")
        after_rotate = published(daemon)
        added = after_rotate - before
        assert len(added) == 1, (before, after_rotate)
        new_kid = added.pop()
        expect(page.locator("code.kid", has_text=new_kid).first).to_be_visible()

        # Revoke the active signing key, with a reason full of HTML.
        old_kid = active_kid(page, "signing")
        page.get_by_role("link", name=f"Revoke {old_kid}").first.click()
        check_page(page, "04-revoke-confirm")
        page.get_by_label("Reason").fill(HOSTILE_REASON)
        page.get_by_role("button", name="Revoke").click()
        expect(page.locator(".flash").first).to_contain_text(f"Revoked signing key {old_kid}")
        assert old_kid not in published(daemon)
        assert active_kid(page, "signing") == new_kid  # the pending key took over at once

        # CSR out, CA-signed certificate in, for the new active key.
        with page.expect_download() as download:
            page.get_by_role("button", name=f"Download CSR for {new_kid}").click()
        csr_pem = Path(download.value.path()).read_bytes()
        assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
        cert_pem, ca = ca_sign(csr_pem)
        cert_file = tmp_path / "signing.pem"
        cert_file.write_bytes(cert_pem)
        page.get_by_role("link", name=f"Upload certificate for {new_kid}").click()
        check_page(page, "05-upload-certificate")
        page.get_by_label("Certificate file").set_input_files(str(cert_file))
        page.get_by_role("button", name="Import certificate").click()
        expect(page.locator(".flash").first).to_contain_text(
            f"Certificate imported for signing key {new_kid}")
        expect(page.locator("section[aria-labelledby='purpose-signing'] dl.facts")
               ).to_contain_text(f"CN={ca}")
        with daemon.public() as public:
            entry = next(k for k in public.get("/jwks").json()["keys"] if k["kid"] == new_kid)
        leaf = x509.load_der_x509_certificate(base64.b64decode(entry["x5c"][0]))
        assert leaf.issuer.rfc4514_string() == f"CN={ca}"
        check_page(page, "06-overview-after-actions")

        # The timeline draws every key version, the revoked one marked.
        page.get_by_role("link", name="Timeline").click()
        expect(page.locator("svg.timeline g.span-active").first).to_be_visible()
        labels = page.locator("svg.timeline g.span title").all_text_contents()
        assert any(new_kid in label and "active from" in label for label in labels)
        revoked_mark = page.locator("svg.timeline g.mark-revoked title").first
        assert HOSTILE_REASON in (revoked_mark.text_content() or "")
        span = page.locator("svg.timeline g.span-active").first
        label = span.locator("text.focus-label")
        expect(label).to_be_hidden()
        span.focus()  # focusing a span says what and when, on the picture itself
        expect(label).to_be_visible()
        assert "active from" in (label.text_content() or "")
        check_page(page, "07-timeline")

        page.get_by_role("link", name="Counterparties").click()
        expect(page.locator("code.kid", has_text="paynet-sig-1")).to_be_visible()
        expect(page.locator("tr", has_text="paynet-sig-1")).to_contain_text("expires soon")
        expect(page.get_by_text("paynet-weak", exact=False)).to_be_visible()  # dropped, and why
        check_page(page, "08-counterparties")

        # Every action is in the audit log under the signed-in client's name,
        # and the revoke reason reads as text, never as markup.
        page.get_by_role("link", name="Audit").click()
        page.get_by_label("Actor").fill("admin-1")
        page.get_by_role("button", name="Filter").click()
        actions = page.locator("table.audit tbody tr td:nth-child(4)").all_inner_texts()
        assert {"key.rotate", "key.revoke", "key.csr", "certificate.import",
                "console.sign_in"} <= set(actions)
        assert set(page.locator("table.audit tbody tr td:nth-child(3)").all_inner_texts()) == {
            "admin-1"}
        expect(page.get_by_text(HOSTILE_REASON).first).to_be_visible()
        assert page.locator("table.audit b, table.audit script").count() == 0
        expect(page.locator("#chain")).to_have_text("Chain: intact")
        check_page(page, "09-audit")

        # Clients: add one (its token shown once and working), then revoke it.
        page.get_by_role("link", name="Clients").click()
        page.get_by_label("Name").fill("ops-bot")
        page.get_by_label("Policy").select_option("service")
        page.get_by_role("button", name="Add client").click()
        token = page.get_by_label("Bearer token").input_value()
        check_page(page, "10-client-added")
        with daemon.client(token) as svc:
            assert svc.post("/v1/sign/jwt", json={"claims": {"a": 1}}).status_code == 200
        page.get_by_role("link", name="Back to the clients").click()
        check_page(page, "11-clients")
        page.get_by_role("link", name="Revoke ops-bot").click()
        page.get_by_role("button", name="Revoke ops-bot").click()
        expect(page.locator(".flash")).to_contain_text("Client ops-bot is revoked")
        with daemon.client(token) as svc:
            assert svc.post("/v1/sign/jwt", json={"claims": {"a": 1}}).status_code == 401

        # A name with HTML in it is refused, and the refusal shows it as text.
        page.get_by_label("Name").fill(HOSTILE_NAME)
        page.get_by_label("Name").evaluate("el => el.removeAttribute('pattern')")
        page.get_by_role("button", name="Add client").click()
        expect(page.locator(".problem")).to_contain_text(HOSTILE_NAME)
        assert page.locator("main img").count() == 0
        check_page(page, "12-refused")

        # Sign out: the old cookie is worth nothing afterwards.
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Signed out")).to_be_visible()
        check_page(page, "13-signed-out")
        page.goto("/console/")
        expect(page).to_have_url(SIGN_IN)
        replay = httpx.get(daemon.api_url + "/console/",
                           cookies={"keyd-console": session_cookie["value"]})
        assert replay.status_code == 303 and replay.headers["location"] == "/console/sign-in"

        assert watch.foreign() == [], "a request left the console's origin"
        assert watch.csp_violations() == []
        assert watch.dialogs == [], "script from a client name or reason ran"


def test_a_service_token_cannot_sign_in(daemon: Daemon, browser: Browser) -> None:
    with context(browser, daemon.api_url) as (ctx, page, watch):
        sign_in(page, daemon.service_token)
        expect(page.locator(".problem")).to_contain_text("not an admin")
        assert not any(c["name"] == "keyd-console" for c in ctx.cookies())
        page.goto("/console/clients")
        expect(page).to_have_url(SIGN_IN)
        sign_in(page, "keyd_not-a-real-token")
        expect(page.locator(".problem")).to_contain_text("not valid")
        assert watch.foreign() == []


def test_a_post_without_its_csrf_token_is_refused(daemon: Daemon, browser: Browser) -> None:
    with context(browser, daemon.api_url) as (ctx, page, watch):
        sign_in(page, daemon.admin_token)
        expect(page.locator(".flash")).to_contain_text("Signed in")
        kids = published(daemon)
        # The browser's own cookies, but no token or a wrong one: refused, nothing done.
        for form in ({}, {"csrf": "forged"}):
            answer = ctx.request.post("/console/keys/encryption/rotate", form=form)
            assert answer.status == 403, answer.text()
            assert "CSRF" in answer.text()
        assert published(daemon) == kids
        page.goto("/console/audit?action=console.rotate")
        expect(page.locator("table.audit tbody tr")).to_have_count(2)
        expect(page.locator("table.audit").get_by_text("refused").first).to_be_visible()


def test_the_console_works_without_javascript(daemon: Daemon, browser: Browser) -> None:
    with context(browser, daemon.api_url, javascript=False) as (ctx, page, watch):
        sign_in(page, daemon.admin_token)
        expect(page.locator(".flash")).to_contain_text("Signed in")
        for link, heading in (("Timeline", "Timeline"), ("Counterparties", "Counterparties"),
                              ("Audit", "Audit log"), ("Clients", "Clients"),
                              ("Overview", "Overview")):
            page.get_by_role("link", name=link, exact=True).click()
            expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        page.get_by_role("link", name="Clients", exact=True).click()
        page.get_by_label("Name").fill("no-script")
        page.get_by_role("button", name="Add client").click()
        assert page.get_by_label("Bearer token").input_value().startswith("keyd_")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Signed out")).to_be_visible()
        assert watch.foreign() == []
