"""The production install (systemd/install.sh, `make install`) into a temp root.

What this machine allows: the wheel built from the checkout, installed with
the script into a root of its own; the files and modes the walk-through in
systemd/README.md relies on; the unit's Documentation= present; and
`systemd-analyze verify` clean on the installed unit with the installed
binary.  Dependencies are not installed (PIP_NO_DEPS, no index): the
program's own files and `keyd --help`, which imports only the standard
library, are what is checked here; tests/smoke/wheel_smoke.py runs a full
wheel install in CI.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_systemd_unit import parse_unit, systemd_analyze

pytestmark = pytest.mark.slow  # a real keyd process per test or module

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("keyd", "migrations", "policies", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, wheel): the wheel built from a copy of the checkout, installed under root."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"  # built from a copy: no build/ or egg-info left in the checkout
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(work / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("keyd-*.whl"))
    root = work / "root"
    install(root, wheel)
    return root, wheel


def install(root: Path, wheel: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PYTHON": sys.executable}
    result = subprocess.run(["sh", str(REPO / "systemd" / "install.sh"), "--root", str(root),
                             str(wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_installed_binary_is_the_units_execstart_and_runs(installed: tuple[Path, Path]) -> None:
    root, _ = installed
    keyd = root / "usr/local/bin/keyd"
    assert os.readlink(keyd) == "../../../opt/keyd/bin/keyd"
    result = subprocess.run([str(keyd), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "init" in result.stdout
    unit = parse_unit((root / "etc/systemd/system/keyd.service").read_text())
    assert unit["Service"]["ExecStart"] == [
        "/usr/local/bin/keyd --config /etc/keyd/config.toml serve"]


def test_installed_package_carries_migrations_and_policies(installed: tuple[Path, Path]) -> None:
    root, _ = installed
    site = next((root / "opt/keyd/lib").glob("python3.*/site-packages/keyd"))
    assert (site / "migrations/env.py").is_file()
    assert any((site / "migrations/versions").glob("0001_*.py"))
    assert {p.name for p in (root / "etc/keyd/policies").glob("*.toml")} == {
        p.name for p in (REPO / "policies").glob("*.toml")}


def test_config_template_is_production_and_refuses_to_run_unfilled(
    installed: tuple[Path, Path],
) -> None:
    root, _ = installed
    text = (root / "etc/keyd/config.toml").read_text()
    assert 'mode = "production"' in text and 'socket = "/run/keyd/keyd.sock"' in text
    assert stat.S_IMODE((root / "etc/keyd/config.toml").stat().st_mode) == 0o640
    from keyd import config
    from keyd.errors import ConfigError
    with pytest.raises(ConfigError, match="client_id must be set"):
        config.load(root / "etc/keyd/config.toml")


def test_master_key_credential_is_32_random_bytes_readable_by_root_only(
    installed: tuple[Path, Path],
) -> None:
    root, _ = installed
    key = root / "etc/credstore/keyd.master-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "etc/credstore").stat().st_mode) == 0o700
    value = key.read_text()
    assert len(base64.urlsafe_b64decode(value + "=")) == 32


def test_documentation_named_by_the_unit_is_installed(installed: tuple[Path, Path]) -> None:
    root, _ = installed
    unit = parse_unit((root / "etc/systemd/system/keyd.service").read_text())
    urls = [u for line in unit["Unit"]["Documentation"] for u in line.split()]
    assert urls and all(u.startswith("file:///") for u in urls)
    for url in urls:
        assert (root / url.removeprefix("file:///")).is_file(), url


def test_systemd_analyze_verify_is_clean_on_the_installed_unit(
    installed: tuple[Path, Path], tmp_path: Path,
) -> None:
    """verify checks ExecStart's binary on this host's /, so point it into the root."""
    root, _ = installed
    text = (root / "etc/systemd/system/keyd.service").read_text()
    unit = tmp_path / "keyd.service"
    unit.write_text(text.replace("/usr/local/bin/keyd", str(root / "usr/local/bin/keyd")))
    result = subprocess.run([systemd_analyze(), "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "keyd.service" in line] == []


def test_install_again_upgrades_but_keeps_config_policies_and_secret(
    installed: tuple[Path, Path],
) -> None:
    root, wheel = installed
    config, key = root / "etc/keyd/config.toml", root / "etc/credstore/keyd.master-key"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    before = (config.read_bytes(), key.read_bytes())
    out = install(root, wheel).stdout
    assert "kept" in out
    assert (config.read_bytes(), key.read_bytes()) == before


def readme_commands() -> list[list[str]]:
    """The keyd and keyd-admin command lines in systemd/README.md's sh blocks."""
    text = (REPO / "systemd" / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line.split(" #", 1)[0], comments=True)
            words = [w for w in words if w != "sudo"]
            if words and words[0] in ("keyd", "keyd-admin"):
                commands.append(words[1:])
    return commands


def test_walkthrough_keyd_commands_parse_with_this_cli() -> None:
    """Every `keyd-admin ...` in systemd/README.md is a command this keyd accepts."""
    from keyd.cli import _parser

    commands = readme_commands()
    assert {c[0] for c in commands} >= {"init", "keys", "csr", "cert", "status", "client"}
    for words in commands:
        redirect = next((i for i, w in enumerate(words) if w in ("<", ">")), len(words))
        _parser().parse_args(words[:redirect])  # a usage error exits 2 and fails the test


def test_walkthrough_make_targets_exist() -> None:
    for target in ("dist", "install"):
        result = subprocess.run(["make", "-n", "-C", str(REPO), target, "WHEEL=x.whl"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_certificate_import_reads_the_chain_from_standard_input(tmp_path: Path) -> None:
    """`keyd-admin cert import KID /dev/stdin < chain.pem` (systemd-run --pipe passes stdin)."""
    from tests.daemon import KEYD, keyd, write_config
    from tests.test_cli import FakeCA

    config = write_config(tmp_path, {"keyd": {"mode": "production"}})
    keyd(config, "init")
    signing = next(k for k in json.loads(keyd(config, "keys", "list", "--json").stdout)
                   if k["purpose"] == "signing")
    chain = FakeCA().issue(keyd(config, "csr", signing["kid"]).stdout)
    result = subprocess.run([*KEYD, "--config", str(config), "cert", "import", signing["kid"],
                             "/dev/stdin"], input=chain, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"active" in result.stdout
