"""Two keyd stores on one OpenBao mount and key_prefix: the first marks the keys
as its own (a small transit key, ``<key_prefix>store-<store id>``), the second
refuses to start with one line naming both stores, instead of erasing the
first one's keys as orphans."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from keyd import config as keyd_config
from keyd import deployment
from keyd.jobs import Jobs
from keyd.service import KeyService
from keyd.store.db import Store
from tests.fixtures.daemon import keyd, write_config
from tests.fixtures.openbao import BaoServer
from tests.fixtures.transit import Transit, least_privilege_transit, vault_tables

pytestmark = pytest.mark.vault

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def transit_keys(openbao: BaoServer, transit: Transit) -> list[str]:
    answer = openbao.client().secrets.transit.list_keys(mount_point=transit.mount)
    return sorted(answer["data"]["keys"])


def store_config(folder: Path, openbao: BaoServer, transit: Transit,
                 prefix: str = "keyd-") -> Path:
    folder.mkdir()
    tables = vault_tables(folder, openbao.addr, transit, transport=False)
    tables["backend.vault"]["key_prefix"] = prefix
    return write_config(folder, tables)


def store_id(config: Path) -> str:
    settings = keyd_config.load(config)
    store = Store(settings.store.url)
    try:
        return deployment.check(store, settings)
    finally:
        store.close()


def test_a_second_store_on_one_key_prefix_refuses_naming_both_and_erases_nothing(
        tmp_path: Path, openbao: BaoServer) -> None:
    transit = least_privilege_transit(openbao)
    first = store_config(tmp_path / "first", openbao, transit)
    keyd(first, "init")
    owner = store_id(first)
    keys = transit_keys(openbao, transit)
    assert f"keyd-store-{owner}" in keys  # the mark, under the shipped policy's keyd-*
    listed = json.loads(keyd(first, "keys", "list", "--json").stdout)

    second = store_config(tmp_path / "second", openbao, transit)
    for command in (("init",), ("keys", "list")):
        refused = keyd(second, *command, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        line = refused.stderr.strip()
        assert (f"vault mount '{transit.mount}' key_prefix 'keyd-' holds the keys of store "
                f"{owner}, but this replica's store is ") in line, line
        other = re.search(rf"this replica's store is ({UUID})", line)
        assert other is not None and other.group(1) != owner
        assert "give each store its own key_prefix" in line
    assert transit_keys(openbao, transit) == keys  # nothing made, nothing erased
    assert json.loads(keyd(first, "keys", "list", "--json").stdout) == listed

    # Another prefix on the same mount is another deployment: fine.
    third = store_config(tmp_path / "third", openbao, transit, prefix="keyd-b-")
    keyd(third, "init")
    assert f"keyd-b-store-{store_id(third)}" in transit_keys(openbao, transit)


def test_the_mark_is_no_key_to_recovery_and_an_unmarked_prefix_is_adopted(
        tmp_path: Path, openbao: BaoServer) -> None:
    """A deployment from before the mark (keys, no mark) is claimed by its store
    on the next start; recovery never lists the mark as an orphan."""
    transit = least_privilege_transit(openbao)
    config = store_config(tmp_path / "only", openbao, transit)
    keyd(config, "init")
    mark = f"keyd-store-{store_id(config)}"
    root = openbao.client().secrets.transit
    root.update_key_configuration(mark, deletion_allowed=True, mount_point=transit.mount)
    root.delete_key(mark, mount_point=transit.mount)
    before = transit_keys(openbao, transit)
    assert mark not in before and before  # the keys of a store from before the mark

    service = KeyService.open(keyd_config.load(config))
    try:
        assert mark in transit_keys(openbao, transit)  # adopted
        assert mark not in service.backend.list_refs()
        report = Jobs(service).recover()
        assert not [d for d in report.done if "erased" in d], report
        assert report.errors == []
        assert transit_keys(openbao, transit) == sorted([*before, mark])
    finally:
        service.close()
