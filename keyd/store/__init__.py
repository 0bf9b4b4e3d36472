"""Persistence: every SQL statement keyd runs, and nothing else.

    db.py       Store: sessions, bare connections, migrations, errors converted
    engines.py  the engine for ``[store] url`` (SQLite pragmas, PostgreSQL timeouts)
    tables.py   the SQLModel tables
    queries.py  keys, certificates, clients, replay, alerts, intents
    audit.py    the audit chain's rows and heads
    lease.py    the leader lease and the replicas table
    locks.py    every advisory lock key, and the one way to take each kind

No business rules live here; keyd/service/ decides, the store remembers.
"""

from keyd.store.db import Store

__all__ = ["Store"]
