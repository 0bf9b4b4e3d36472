"""Building the engine from ``[store] url``: SQLite's pragmas, PostgreSQL's timeouts.

A URL keyd cannot use (unparseable, another database, a driver that will not
load) is a ConfigError naming it, password masked, in one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from keyd.errors import ConfigError

# Execution option read by the SQLite "begin" hook: how to open a transaction.
BEGIN = "keyd_sqlite_begin"

# A store outage stays local (one replica cut off must not stall the others):
# - connect_timeout: fail closed fast when the server is down;
# - TCP keepalives and tcp_user_timeout: a black-holed connection is declared
#   dead in ~10 s instead of hanging a pooled connection for the whole outage;
# - statement_timeout / lock_timeout: no statement or lock wait (the audit or
#   lifecycle advisory locks included) outlasts them;
# - idle_in_transaction_session_timeout, shorter than lock_timeout: the
#   server ends the session of a replica that went quiet inside a
#   transaction, releasing the locks it held (its transaction-level advisory
#   locks die with it) before the replicas waiting on them give up.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 10_000,
    "options": "-c statement_timeout=15000 -c lock_timeout=15000 "
               "-c idle_in_transaction_session_timeout=5000",
}



def make_engine(url: URL) -> Engine:
    """The engine for a URL from ``parse_url``."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    args = dict(PG_CONNECT_ARGS)
    given = url.query.get("options")
    if isinstance(given, str):  # the URL's own options come first
        args["options"] = f"{given} {args['options']}"
        url = url.difference_update_query(["options"])
    return _postgresql_engine(url, args)


def parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise ConfigError(
            f"[store] url {_masked(url)!r} is not a database URL: {_one_line(e)}") from e
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # psycopg 3 is the one PostgreSQL driver keyd ships with.
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return parsed
    raise ConfigError(
        f"[store] url: unsupported database {backend!r}; use sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST/DB"
    )


def _postgresql_engine(url: URL, connect_args: dict[str, Any]) -> Engine:
    try:
        return create_engine(
            url,
            pool_pre_ping=True,  # a restarted server costs one retry, not an error
            connect_args=connect_args,
        )
    except (ImportError, NoSuchModuleError) as e:
        shown = url.render_as_string(hide_password=True)
        raise ConfigError(f"[store] url {shown!r}: its driver {url.drivername!r} cannot be "
                          f"loaded ({_one_line(e)}); reinstall keyd with psycopg[binary]") from e
    except (ArgumentError, ValueError, TypeError) as e:
        shown = url.render_as_string(hide_password=True)
        raise ConfigError(f"[store] url {shown!r}: {_one_line(e)}") from e


def _masked(url: str) -> str:
    """``url`` with the password of ``scheme://user:password@host`` hidden."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _one_line(e: BaseException) -> str:
    text_ = str(e).strip()
    return text_.splitlines()[0] if text_ else type(e).__name__


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    is_uri = str(url.query.get("uri", "")).lower() == "true" or database.startswith("file:")
    if database and database != ":memory:" and not is_uri:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, connect_args={"check_same_thread": False})
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"[store] url: {e}") from e

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would
        # BEGIN lazily and DEFERRED); SQLAlchemy's "begin" hook below does it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            # WAL: readers never block the writer.  FULL: a commit is on disk
            # when it returns (the audit log promises durability).  The busy
            # timeout lets the CLI and the daemon queue for the write lock.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(BEGIN, "BEGIN"))

    return engine
