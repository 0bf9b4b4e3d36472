"""Persistence: SQLModel tables, the engine and sessions, typed queries.

No business rules live here; keyd/service/ decides, the store remembers.
"""

from keyd.store.db import Store

__all__ = ["Store"]
