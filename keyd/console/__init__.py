"""The admin console: keys, certificates and expiries at a glance, in the browser.

Served by keyd at /console on the local API listener; see keyd/console/app.py.
"""

from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Mount, Route

from keyd.console.app import create_console
from keyd.service import KeyService


def console_routes(service: KeyService) -> list[BaseRoute]:
    """The routes that put the console at /console on the local API's app."""
    return [
        Route("/console", lambda request: RedirectResponse("/console/", 308), methods=["GET"]),
        Mount("/console", app=create_console(service)),
    ]


__all__ = ["console_routes", "create_console"]
