"""The backend registry: one plugin per kind, found by kind, loaded only when asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keyd import backends, config
from keyd.backends.base import BackendPlugin
from keyd.errors import ConfigError


@pytest.mark.parametrize("kind", backends.KINDS)
def test_each_kind_has_a_plugin_that_names_itself(kind: str) -> None:
    plugin = backends.plugin(kind)
    assert isinstance(plugin, BackendPlugin)
    assert plugin.kind == plugin.capabilities.name == kind


def test_an_unknown_kind_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="'hsm' is not one of local, vault, pkcs11"):
        backends.plugin("hsm")


def test_a_local_deployment_loads_neither_hvac_nor_pkcs11() -> None:
    """Plugins load lazily by kind: reading a local config and asking the
    registry about it imports no other backend's library."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from keyd import backends, config\n"
        "s = config.from_dict({'keyd': {'client_id': 'c', 'organisation': 'o'}},"
        " Path('/etc/keyd/config.toml'))\n"
        "backends.plugin(s.backend.kind).capabilities\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    loaded = set(json.loads(out.stdout))
    assert "keyd.backends.local" in loaded
    assert not loaded & {"hvac", "pkcs11", "keyd.backends.vault", "keyd.backends.pkcs11"}


def test_local_prepare_makes_the_master_key_once_and_the_backend_uses_it(
        tmp_path: Path) -> None:
    settings = config.from_dict(
        {"keyd": {"client_id": "c", "organisation": "o", "data_dir": str(tmp_path / "var")}},
        tmp_path / "config.toml")
    assert backends.identity(settings) is None  # no master key yet
    said = backends.prepare(settings)
    assert len(said) == 1 and "created master key" in said[0]
    assert backends.prepare(settings) == []  # idempotent: the key is there now
    identity = backends.identity(settings)
    assert identity is not None and identity.startswith("local master key ")
    backend = backends.open_backend(settings)
    try:
        assert backend.capabilities == backends.plugin("local").capabilities
    finally:
        backend.close()


@pytest.mark.parametrize("kind", ["vault", "pkcs11"])
def test_prepare_is_nothing_where_the_keys_live_outside_keyd(kind: str, tmp_path: Path) -> None:
    settings = config.from_dict(
        {"keyd": {"client_id": "c", "organisation": "o", "data_dir": str(tmp_path / "var")},
         "backend": {"kind": kind}}, tmp_path / "config.toml")
    assert backends.prepare(settings) == []
    assert not (tmp_path / "var").exists()
    assert kind in (backends.identity(settings) or "")
