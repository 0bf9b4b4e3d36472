"""A quick CLI: `keyd --help` and `keyd status` import only what they use.

Checked on the modules a real `keyd` process has loaded when it finishes (no
timing: bench/cli_startup.py reports the start-up ratio).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import keyd, write_config

pytestmark = pytest.mark.slow  # a fresh interpreter per test: that is the point

# Run the CLI in a fresh interpreter, then list the top-level packages it loaded.
PROBE = """
import json, sys
from keyd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("\\n" + json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""
HEAVY = {"sqlalchemy", "sqlmodel", "alembic", "httpx", "hvac", "pkcs11", "starlette",
         "uvicorn", "jwcrypto", "apscheduler", "prometheus_client", "psycopg"}


def loaded(*argv: str, cwd: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result = json.loads(out.rstrip().rsplit("\n", 1)[-1])
    assert result["code"] == 0, out
    return set(result["modules"])


def test_help_loads_no_library_beyond_the_standard_one(tmp_path: Path) -> None:
    assert loaded("--help", cwd=tmp_path) & HEAVY == set()


def test_status_on_a_local_store_skips_migrations_the_web_stack_and_remote_backends(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {})
    keyd(config, "init")
    modules = loaded("--config", str(config), "status", cwd=tmp_path)
    # The store is read (SQLAlchemy), but an up-to-date schema needs no Alembic.
    assert "sqlalchemy" in modules
    # (jwcrypto comes with keyd.jose's verify half: cheap, and not worth a seam.)
    assert modules & (HEAVY - {"sqlalchemy", "sqlmodel", "psycopg", "jwcrypto"}) == set()
