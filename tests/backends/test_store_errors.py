"""SQLAlchemy stops at the store: bad URLs, missing drivers and unreachable
databases reach callers as keyd's own errors, in one line naming the value."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import SQLAlchemyError

from keyd.audit import AuditEvent, AuditLog, EventFilter
from keyd.clock import SettableClock
from keyd.errors import ConfigError, KeydError, StoreUnavailable
from keyd.lease import Lease
from keyd.store.db import Store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def unreachable() -> Iterator[Store]:
    """A PostgreSQL store on a port nobody listens on: every connect is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = Store(f"postgresql+psycopg://postgres@127.0.0.1:{port}/keyd")
    try:
        yield store
    finally:
        store.close()


def _one_line_config_error(url: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Store(url)
    assert type(caught.value.__cause__) is not type(caught.value)  # raised from the cause
    assert "\n" not in caught.value.detail
    return caught.value


def test_a_postgresql_url_with_a_bad_port_is_one_config_line_naming_it() -> None:
    error = _one_line_config_error("postgresql://keyd:hunter2@db.example:5x32/keyd")
    assert "db.example:5x32" in error.detail and "[store] url" in error.detail
    assert "hunter2" not in error.detail  # the password never reaches a message


def test_a_missing_postgresql_driver_is_one_config_line_naming_the_driver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the fault: psycopg not importable
    error = _one_line_config_error("postgresql://keyd:hunter2@db.example/keyd")
    assert "'postgresql+psycopg'" in error.detail and "psycopg" in error.detail
    assert "db.example" in error.detail and "hunter2" not in error.detail
    assert isinstance(error.__cause__, ImportError)


def test_a_bare_connection_to_an_unreachable_database_is_store_unavailable(
        unreachable: Store) -> None:
    with pytest.raises(StoreUnavailable, match="database connect"):
        unreachable.connect(write=True)


def test_the_audit_log_on_an_unreachable_database_raises_only_keyd_errors(
        unreachable: Store) -> None:
    """Writing (the writer thread and inside a session), verifying, heads and
    reading: each fails closed as StoreUnavailable, never a SQLAlchemy type."""
    audit = AuditLog(unreachable, SettableClock(T0))
    calls: dict[str, Callable[[], object]] = {
        "record": lambda: audit.record(AuditEvent(actor="svc", action="sign.jws")),
        "verify": audit.verify,
        "head": audit.head,
        "segments": audit.segments,
        "reaches": lambda: audit.reaches(1, "a" * 64),
        "list": audit.list,
        "page": lambda: audit.page(before=("legacy", 3)),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(KeydError) as caught:
                call()
            assert type(caught.value) is StoreUnavailable, name
            assert not isinstance(caught.value, SQLAlchemyError), name
    finally:
        audit.close()


def test_a_naive_time_given_to_an_audit_read_is_a_value_error_not_a_sqlalchemy_one(
        store: Store) -> None:
    audit = AuditLog(store, SettableClock(T0))
    try:
        with pytest.raises(ValueError, match="naive datetime") as caught:
            audit.list(EventFilter(since=datetime(2025, 3, 1)))  # noqa: DTZ001 - the programming error
        assert not isinstance(caught.value, SQLAlchemyError)
    finally:
        audit.close()


def test_a_lease_on_an_unreachable_database_is_simply_not_held(unreachable: Store) -> None:
    lease = Lease(unreachable, timedelta(seconds=30), replica="r1")
    try:
        assert lease.tick() is False and not lease.is_leader()
    finally:
        lease.stop()
