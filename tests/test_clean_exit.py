"""A test session leaves no process behind: not on success, not on failure,
not when CI's timeout SIGTERMs it, not even when it is SIGKILLed.

Each case runs a small pytest session of its own (two xdist workers, the
shared OpenBao dev server, a real daemon) under a helper that makes itself a
child subreaper (PR_SET_CHILD_SUBREAPER): every process the session starts,
detached or not, is re-parented to the helper when its own parent dies.  So
once the session is over, any child the helper still has outlived it.  The
outer session's xdist workers are not involved: the check is exact whatever
else runs on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real keyd process per test or module

REPO = Path(__file__).resolve().parent.parent

# Runs the session, optionally signals it once the marker file appears, then
# waits (bounded) for its leftovers to go, reaping them, and reports any that
# did not.  Survivors are killed afterwards so a failure here leaks nothing.
HELPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
spec = json.loads(sys.argv[1])
session = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
held = False
if spec["signal"]:
    while not (held := os.path.exists(spec["marker"])) and session.poll() is None:
        time.sleep(0.05)
    session.send_signal(spec["signal"])
output = session.communicate()[0].decode(errors="replace")

def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass

def children():
    found = {}
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == os.getpid():
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found

deadline = time.monotonic() + spec["grace"]
while True:
    reap()
    survivors = children()
    if not survivors or time.monotonic() > deadline:
        break
    time.sleep(0.1)
for pid in survivors:
    os.kill(pid, signal.SIGKILL)
time.sleep(0.2)
reap()
print(json.dumps({"code": session.returncode, "survivors": survivors, "held": held,
                  "output": output[-3000:]}))
"""

INNER_TESTS = '''
import os, time
from pathlib import Path
from tests.daemon import running

def test_server_and_daemon_up(openbao, tmp_path):
    assert openbao.client().sys.is_initialized()
    with running(tmp_path) as daemon:
        assert daemon.healthy()
        if os.environ.get("HOLD_MARKER"):
            Path(os.environ["HOLD_MARKER"]).write_text("up")
            time.sleep(5)  # the outer test signals the session now

def test_a_failure(openbao):
    assert openbao.client().sys.is_initialized()
    assert False, "failing on purpose: the session must still clean up"
'''

# Seconds the session's processes get to go once it has ended (a tether sees
# its owner exit at once; a worker still in its test finishes it first).
GRACE = 30


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp folder: the inner daemons' unix socket paths must fit in 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="keyd-ce-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_session(tmp_path: Path, sig: int | None) -> dict[str, object]:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.fixtures.openbao"]\n')
    (inner / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    marker = tmp_path / "held"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HOLD_"))}
    env["PYTHONPATH"] = str(REPO)
    if sig is not None:
        env["HOLD_MARKER"] = str(marker)
    spec = {
        "argv": [sys.executable, "-m", "pytest", "-q", "-n", "2", "-c", str(inner / "pytest.ini"),
                 "--rootdir", str(inner), "--basetemp", str(tmp_path / "t"),
                 str(inner / "test_inner.py")],
        "cwd": str(inner), "env": env, "signal": sig, "marker": str(marker), "grace": GRACE,
    }
    out = subprocess.run([sys.executable, "-c", HELPER, json.dumps(spec)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_a_failing_session_stops_its_server_and_daemons(short_tmp: Path) -> None:
    result = run_session(short_tmp, None)
    assert result["code"] == 1, result["output"]  # the one failure, nothing else
    assert "1 failed, 1 passed" in str(result["output"])
    assert result["survivors"] == {}, result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_session_leaves_no_process(short_tmp: Path, sig: int) -> None:
    """CI's timeout sends SIGTERM; SIGKILL leaves the session no chance to clean up."""
    result = run_session(short_tmp, sig)
    assert result["held"], result["output"]  # signalled with its server and daemon up
    assert result["code"] != 0, result["output"]
    assert result["survivors"] == {}, result
