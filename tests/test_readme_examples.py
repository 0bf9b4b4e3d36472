"""The README's code runs as written: its Python example against a live daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_jwe_and_detached_signature_example_runs_against_a_live_daemon(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert len(blocks) == 1
    with running(tmp_path) as daemon:
        env = {**os.environ, "KEYD_API": daemon.api_url, "KEYD_JWKS": daemon.public_url + "/jwks",
               "TOKEN": daemon.service_token}
        result = subprocess.run([sys.executable, "-c", blocks[0]], env=env, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "decrypted: {'balance': '1.00'}" in result.stdout
    assert "verified: kid" in result.stdout and "['iss', 'iat', 'jti']" in result.stdout
