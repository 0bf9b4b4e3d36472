"""The migration fast path: an up-to-date store skips Alembic; anything else runs it."""

from __future__ import annotations

from pathlib import Path

from keyd.resources import migrations_dir
from keyd.store.db import Store, _script_head

SCRIPT = 'revision: str = "{rev}"\ndown_revision: str | None = {down}\n'


def write(folder: Path, name: str, rev: str, down: str) -> None:
    (folder / f"{name}.py").write_text(SCRIPT.format(rev=rev, down=down))


def test_head_of_a_linear_history_is_its_last_revision(tmp_path: Path) -> None:
    write(tmp_path, "a", "0001", "None")
    write(tmp_path, "b", "0002", '"0001"')
    write(tmp_path, "c", "0003", '"0002"')
    assert _script_head(tmp_path) == "0003"


def test_branches_merges_and_unreadable_scripts_leave_it_to_alembic(tmp_path: Path) -> None:
    write(tmp_path, "a", "0001", "None")
    write(tmp_path, "b", "0002a", '"0001"')
    write(tmp_path, "c", "0002b", '"0001"')
    assert _script_head(tmp_path) is None  # two heads
    write(tmp_path, "d", "0003", '("0002a", "0002b")')
    assert _script_head(tmp_path) is None  # a merge revision
    (tmp_path / "e.py").write_text("revision = make_id()\ndown_revision = None\n")
    assert _script_head(tmp_path) is None


def test_shipped_scripts_have_one_head_and_a_migrated_store_is_at_it(tmp_path: Path) -> None:
    assert _script_head(migrations_dir() / "versions") is not None
    store = Store(f"sqlite:///{tmp_path / 'keyd.db'}")
    try:
        assert not store._at_head()  # empty: Alembic must run
        store.migrate()
        assert store._at_head()
        store.migrate()  # the fast path, harmless
    finally:
        store.close()
