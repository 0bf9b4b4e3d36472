"""Who this process is among the processes sharing one store.

A replica is named ``host:pid``: unique among live processes (the pid on its
host), readable in `/readyz`, `keyd status` and the audit log, and checkable
for death on the same host, so work claimed by a process that was killed
(a key intent) can be cleaned up at once instead of after a grace period.
"""

from __future__ import annotations

import os
import socket
from functools import cache


@cache
def host() -> str:
    return socket.gethostname() or "localhost"


def this_replica() -> str:
    # Not cached: a forked child is another replica.
    return f"{host()}:{os.getpid()}"


def known_dead(replica: str) -> bool:
    """True only when ``replica`` ran on this host and its process is gone.

    A process on another host, or a pid now reused, counts as alive: the
    caller then waits for the claim's grace period, which is always safe.
    """
    name, _, pid_text = replica.rpartition(":")
    if name != host() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
