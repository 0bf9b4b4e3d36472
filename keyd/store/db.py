"""The database: sessions, migrations, error conversion.  SQLAlchemy errors stop here.

SQLite (the embedded default) and PostgreSQL behave the same to callers:
every session commits on success and rolls back on error, and a database
that is locked, read-only or unreachable surfaces as ``StoreUnavailable``
(503, fail closed), never as a SQLAlchemy exception.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    SQLAlchemyError,
    StatementError,
)
from sqlmodel import Session

from keyd.errors import ConfigError, Conflict, StoreUnavailable
from keyd.resources import migrations_dir
from keyd.store.engines import BEGIN as _BEGIN
from keyd.store.engines import make_engine, parse_url
from keyd.store.locks import MIGRATE_LOCK, WriterTurn, lock_transaction

log = logging.getLogger(__name__)

_REVISION = re.compile(r"^(down_revision|revision)\b[^=]*=\s*(.+)$", re.MULTILINE)


def _script_head(folder: Path) -> str | None:
    """The single head of a linear revision history, read from the scripts' text."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in folder.glob("*.py"):
        try:
            text_ = script.read_text("utf-8")
            found = {m.group(1): m.group(2) for m in _REVISION.finditer(text_)}
            revision = ast.literal_eval(found["revision"])
            parent = ast.literal_eval(found["down_revision"])
        except (OSError, UnicodeDecodeError, KeyError, ValueError, SyntaxError):
            return None
        if not isinstance(revision, str) or not isinstance(parent, str | None):
            return None  # a merge revision (a tuple of parents): let Alembic decide
        revisions.add(revision)
        if parent is not None:
            parents.add(parent)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


class Store:
    """One database, reached through one engine (a pool of connections)."""

    def __init__(self, url: str) -> None:
        self._url = parse_url(url)
        self.dialect = self._url.get_backend_name()  # "sqlite" | "postgresql"
        # Sessions open on each thread, innermost last: lets the audit log
        # join the caller's transaction instead of waiting on a lock it holds.
        self._local = threading.local()
        self._engine = make_engine(self._url)
        database = self.file_path()
        self._turn = None if database is None else WriterTurn(database)

    def __repr__(self) -> str:
        return f"Store({self._url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> Engine:
        return self._engine

    # -------------------------------------------------------------- migrations

    def migrate(self) -> None:
        """Bring the schema to head; running it again (or concurrently) is harmless."""
        if self._at_head():
            return  # the common case: no Alembic import, no write lock (a quick `keyd status`)
        from alembic import command
        from alembic.config import Config
        from alembic.util.exc import CommandError

        folder = migrations_dir()
        if not (folder / "env.py").is_file():
            raise ConfigError(f"migrations folder {folder} has no env.py; reinstall keyd")
        cfg = Config()
        cfg.set_main_option("script_location", str(folder))
        cfg.set_main_option("path_separator", "os")
        try:
            with self._engine.connect() as conn:
                # One transaction for the whole upgrade, holding the write lock
                # (SQLite) or an advisory lock (PostgreSQL) so that `keyd init`
                # and a starting daemon cannot both apply the same revision.
                conn.execution_options(**{_BEGIN: "BEGIN IMMEDIATE"})
                with conn.begin():
                    lock_transaction(conn, MIGRATE_LOCK)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
        except CommandError as e:
            raise ConfigError(f"store migration failed: {e}") from e
        except SQLAlchemyError as e:
            raise store_error(e, "schema migration") from e

    def _at_head(self) -> bool:
        """The store already holds the one head revision of the shipped scripts.

        A cheap read that lets every open skip Alembic; anything unusual (no
        version table, several heads, a script it cannot read) answers False
        and the full, locked upgrade runs as before.
        """
        head = _script_head(migrations_dir() / "versions")
        if head is None:
            return False
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        except SQLAlchemyError:
            return False
        return [r[0] for r in rows] == [head]

    # ---------------------------------------------------------------- sessions

    @contextlib.contextmanager
    def session(
        self, operation: str = "database transaction", *, write: bool = False
    ) -> Iterator[Session]:
        """A unit of work: commit on success, rollback on any error.

        ``write=True`` takes SQLite's write lock when the transaction begins
        (``BEGIN IMMEDIATE``).  Use it for read-then-write work: a deferred
        SQLite transaction that has read and then tries to write fails at once
        (SQLITE_BUSY_SNAPSHOT, no busy wait) if another writer committed in
        between.  On PostgreSQL it changes nothing.

        Objects stay readable after the block (no expire on commit).
        """
        stack = self._sessions()
        try:
            with Session(self._engine, expire_on_commit=False) as session:
                if write:
                    session.connection(execution_options={_BEGIN: "BEGIN IMMEDIATE"})
                stack.append(session)
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
                finally:
                    stack.pop()
        except SQLAlchemyError as e:
            raise store_error(e, operation) from e

    def connect(self, *, write: bool = False) -> Connection:
        """A bare connection for a long-lived writer (the audit log, the lease).

        The caller owns it: a ``transaction()`` per unit of work, ``release()``
        when done.  StoreUnavailable when the database cannot be reached.
        """
        with self.converted("database connect"):
            conn = self._engine.connect()
            if write:
                conn.execution_options(**{_BEGIN: "BEGIN IMMEDIATE"})
        return conn

    @contextlib.contextmanager
    def transaction(self, conn: Connection, operation: str) -> Iterator[Connection]:
        """One transaction on a connection from ``connect()``: committed when the
        block ends, rolled back on an error, SQLAlchemy errors converted."""
        with self.converted(operation), conn.begin():
            yield conn

    def writer_turn(self) -> contextlib.AbstractContextManager[None]:
        """Around a busy writer's transaction: its turn among this host's
        processes (SQLite, see ``WriterTurn``); nothing to wait for on PostgreSQL."""
        return contextlib.nullcontext() if self._turn is None else self._turn.taken()

    @staticmethod
    @contextlib.contextmanager
    def converted(operation: str) -> Iterator[None]:
        """Raise SQLAlchemy errors from the block as keyd's (``store_error``)."""
        try:
            yield
        except SQLAlchemyError as e:
            raise store_error(e, operation) from e

    @staticmethod
    def release(conn: Connection, *, broken: bool = False) -> None:
        """Close a connection from ``connect()``; ``broken``: never back into the
        pool (it may be dead, or hold a session lock).  Never raises."""
        try:
            if broken:
                conn.invalidate()
            conn.close()
        except SQLAlchemyError as e:
            log.warning("closing a database connection failed: %s", _reason(e))

    def active_session(self) -> Session | None:
        """The innermost session this thread has open on this store, if any."""
        stack = self._sessions()
        return stack[-1] if stack else None

    def _sessions(self) -> list[Session]:
        stack: list[Session] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def file_path(self) -> Path | None:
        """The SQLite database file (None for PostgreSQL or an in-memory database)."""
        if self.dialect != "sqlite":
            return None
        database = self._url.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return Path(database)

    def now(self, conn: Connection) -> datetime:
        """The database's clock: one clock for every replica on PostgreSQL.

        (SQLite lives on one host, whose clock every process shares.)
        """
        if self.dialect == "postgresql":
            with self.converted("reading the database's clock"):
                value = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
            assert isinstance(value, datetime)
            return value.astimezone(UTC)
        return datetime.now(UTC)

    def ping(self, *, write: bool = False) -> None:
        """Raises StoreUnavailable unless the database answers (``write``: and
        would take a write: a read-only or locked database fails it)."""
        with self.session("ping", write=write) as s:
            conn = s.connection()
            conn.execute(text("SELECT 1"))
            if write and self.dialect == "postgresql":
                # Refused on a read-only transaction or a standby (hot standby).
                conn.execute(text("SELECT txid_current()"))

    def close(self) -> None:
        self._engine.dispose()
        if self._turn is not None:
            self._turn.close()


def store_error(e: SQLAlchemyError, operation: str) -> Exception:
    """The keyd error for a SQLAlchemy one, to raise ``from e``.

    IntegrityError -> Conflict; everything else -> StoreUnavailable.  The
    message names the operation and the database's reason, never the SQL
    statement or its parameters.
    """
    if isinstance(e, IntegrityError):
        return Conflict(f"{operation} refused by the database: {_reason(e)}")
    if isinstance(e, StatementError) and not isinstance(e, DBAPIError):
        # A Python value the column type refused (e.g. a naive datetime):
        # a programming error, reported as such rather than as an outage.
        return ValueError(f"{operation}: {_reason(e)}")
    return StoreUnavailable(f"store unavailable during {operation}: {_reason(e)}")


def _reason(e: SQLAlchemyError) -> str:
    orig = getattr(e, "orig", None)
    reason = str(orig) if orig is not None else type(e).__name__
    return reason.strip().splitlines()[0] if reason.strip() else type(e).__name__
