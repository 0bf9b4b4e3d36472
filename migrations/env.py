"""Alembic environment: runs only through keyd.store.Store.migrate().

The Store hands over its own connection (``config.attributes["connection"]``),
already inside a transaction and holding the migration lock, so the SQLite
pragmas and the PostgreSQL driver settings are the ones every other session
uses.  There is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run keyd migrations through keyd.store.Store.migrate()")

context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
