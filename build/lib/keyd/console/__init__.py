"""The admin console: keys, certificates and expiries at a glance, in the browser.

Served by keyd at /console on the local API listener; see keyd/console/app.py.
"""

from keyd.console.app import create_console

__all__ = ["create_console"]
