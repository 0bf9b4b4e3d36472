"""A real browser for the console tests: Debian's chromium driven by Playwright.

Playwright never downloads a browser here: `make setup` installs Debian's
``chromium`` and axe-core (npm, into .npm/).  Each page visited can be
checked for accessibility with axe-core and kept as a screenshot under
test-artifacts/console/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.daemon import REPO

CHROMIUM = Path("/usr/bin/chromium")
AXE = REPO / ".npm" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = REPO / "test-artifacts" / "console"
# axe-core impacts that fail a page; "moderate" and "minor" are reported only.
FAILING_IMPACTS = {"serious", "critical"}


@contextmanager
def chromium() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is missing: run `make setup`"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watch:
    """What a browser context did: every request's URL, CSP reports, dialogs."""

    origin: str
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """Requests that left the console's origin (there must be none)."""
        return [u for u in self.requests
                if not (u.startswith(self.origin + "/") or u == self.origin)]

    def csp_violations(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]


@contextmanager
def context(browser: Browser, origin: str, *, javascript: bool = True
            ) -> Iterator[tuple[BrowserContext, Page, Watch]]:
    ctx = browser.new_context(base_url=origin, accept_downloads=True,
                              java_script_enabled=javascript,
                              viewport={"width": 1280, "height": 900})
    watch = Watch(origin)
    ctx.on("request", lambda request: watch.requests.append(request.url))
    page = ctx.new_page()
    page.on("console", lambda message: watch.console.append(message.text))

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield ctx, page, watch
    finally:
        ctx.close()


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now.

    axe is evaluated through the DevTools protocol, which the page's CSP does
    not govern: the console's own policy stays exactly as served.
    """
    page.evaluate(AXE.read_text())
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "help": v["help"],
         "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"] if v["impact"] in FAILING_IMPACTS
    ]


def check_page(page: Page, name: str) -> None:
    """Keep a screenshot of the page and require no serious accessibility problem."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^a-z0-9_-]", "-", name.lower())
    page.screenshot(path=str(ARTIFACTS / f"{safe}.png"), full_page=True)
    violations = axe_violations(page)
    assert not violations, f"{name}: accessibility violations {violations}"
