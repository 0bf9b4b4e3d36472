"""Deployment guards on SQLite and PostgreSQL: the store records the backend it
serves and refuses another; a replica whose clock is off the database's refuses."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyd import config, deployment
from keyd.clock import SettableClock
from keyd.errors import ConfigError
from keyd.store.db import Store
from tests.fixtures.daemon import write_config


def vault_settings(folder: Path, store_url: str, prefix: str) -> config.Settings:
    folder.mkdir(exist_ok=True)
    return config.load(write_config(folder, {
        "backend": {"kind": "vault"},
        "backend.vault": {"addr": "http://127.0.0.1:1", "mount": "transit", "key_prefix": prefix,
                          "auth": "token"},
        "store": {"url": store_url},
    }))


def test_the_store_keeps_the_first_backend_and_refuses_another_naming_both(
        tmp_path: Path, store: Store, store_url: str) -> None:
    first = vault_settings(tmp_path / "a", store_url, "keyd-")
    store_id = deployment.check(store, first)
    assert deployment.check(store, first) == store_id  # the same backend: fine, same id
    other = vault_settings(tmp_path / "b", store_url, "other-")
    with pytest.raises(ConfigError) as caught:
        deployment.check(store, other)
    message = caught.value.detail
    assert store_id in message and "key_prefix 'keyd-'" in message
    assert "this replica's backend is vault mount 'transit' key_prefix 'other-'" in message
    moved = replace(first, backend=replace(first.backend, options=replace(
        first.backend.options_as(config.VaultBackendSettings), mount="transit-2")))
    with pytest.raises(ConfigError, match="mount 'transit-2'"):
        deployment.check(store, moved)


def test_a_replica_whose_clock_is_off_the_database_s_refuses_to_start(store: Store) -> None:
    clock = SettableClock(datetime.now(UTC))
    deployment.check_clock(store, clock)
    clock.set(datetime.now(UTC) + timedelta(seconds=30))
    with pytest.raises(ConfigError, match=r"clock is 3\d\.\ds off the database's"):
        deployment.check_clock(store, clock)
