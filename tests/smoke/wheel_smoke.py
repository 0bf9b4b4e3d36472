"""The wheel smoke test (.ci/run): keyd as an operator installs it.

Builds the sdist and, from it, the wheel (so both must carry migrations/ and
policies/), installs the wheel alone into a fresh venv outside the checkout,
then from an empty folder: `keyd init`, `keyd client add`, `keyd serve`, the
JWKS fetched over HTTP, a JWS signed through the local API and verified with
the fetched JWKS by an independent library (joserfc, run from the checkout's
venv, not the fresh one), `keyd keys list --json`, and a clean stop.

Prints one line per step and a last line "wheel smoke: OK" or
"wheel smoke: FAILED: ..."; exits 0 or 1.  Usage:
    python tests/smoke/wheel_smoke.py [--keep]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from joserfc import jws
from joserfc.jwk import KeySet

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
CONFIG = """\
[keyd]
mode = "sandbox"
client_id = "smoke-client-0001"
organisation = "Smoke Test Participant"

[public]
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"
"""
# What an install cannot work without: the Alembic scripts and the default policies.
WHEEL_MUST_HOLD = ("keyd/migrations/env.py", "keyd/migrations/script.py.mako",
                   "keyd/migrations/versions/0001_initial.py",
                   "keyd/policies/admin.toml", "keyd/policies/service.toml",
                   "keyd/policies/vault/keyd-transit.hcl")
SDIST_MUST_HOLD = ("setup.py", "migrations/env.py", "migrations/versions/0001_initial.py",
                   "policies/admin.toml", "policies/service.toml",
                   # what `make install` needs beside the wheel (MANIFEST.in)
                   "Makefile", "systemd/install.sh", "systemd/keyd.service",
                   "systemd/keyd-admin", "systemd/config.toml", "systemd/README.md",
                   "docs/config.md", "README.md")


class SmokeFailure(Exception):
    pass


def step(message: str) -> None:
    print(f"wheel smoke: {message}", flush=True)


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise SmokeFailure(f"{' '.join(argv)} exited {result.returncode}:\n"
                           f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return result.stdout


def build(out: Path) -> Path:
    """sdist first, then the wheel built from that sdist (python -m build's default)."""
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    sdists, wheels = list(out.glob("keyd-*.tar.gz")), list(out.glob("keyd-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise SmokeFailure(f"expected one sdist and one wheel, got {sdists + wheels}")
    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    if missing := [n for n in SDIST_MUST_HOLD if n not in names]:
        raise SmokeFailure(f"sdist {sdists[0].name} lacks {missing}")
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
    if missing := [n for n in WHEEL_MUST_HOLD if n not in names]:
        raise SmokeFailure(f"wheel {wheels[0].name} lacks {missing}")
    step(f"built {sdists[0].name} and {wheels[0].name}; both carry migrations and policies")
    return wheels[0]


def install(wheel: Path, venv: Path) -> Path:
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent)
    run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        cwd=venv.parent)
    keyd = venv / "bin" / "keyd"
    where = run([str(venv / "bin" / "python"), "-c", "import keyd; print(keyd.__file__)"],
                cwd=venv.parent).strip()
    if not where.startswith(str(venv)):
        raise SmokeFailure(f"keyd imported from {where}, not from the fresh venv")
    step(f"installed into {venv} (keyd from {Path(where).parent})")
    return keyd


def serve_and_check(keyd: Path, work: Path, env: dict[str, str]) -> None:
    (work / "config.toml").write_text(CONFIG)  # the folder holds nothing else
    run([str(keyd), "init"], cwd=work, env=env)
    token = run([str(keyd), "client", "add", "smoke", "--policy", "service"],
                cwd=work, env=env).strip()
    step("init and client add in a folder holding only config.toml (shipped policies)")
    endpoints = work / "var" / "endpoints.json"
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([str(keyd), "serve"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not endpoints.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SmokeFailure("keyd serve did not start:\n" +
                                   (work / "serve.log").read_text()[-3000:])
            time.sleep(0.1)  # readiness poll
        addresses = json.loads(endpoints.read_text())
        jwks = httpx.get(f"http://{addresses['public']}/jwks", timeout=10)
        jwks.raise_for_status()
        key_set = KeySet.import_key_set(jwks.json())
        step(f"GET /jwks: {len(jwks.json()['keys'])} keys")
        signed = httpx.post(f"http://{addresses['api']}/v1/sign/jws", timeout=10,
                            headers={"Authorization": f"Bearer {token}"},
                            json={"payload": {"smoke": True}})
        signed.raise_for_status()
        compact = signed.json()["jws"]
        obj = jws.deserialize_compact(compact, key_set, algorithms=["PS256"])
        if json.loads(obj.payload) != {"smoke": True}:
            raise SmokeFailure(f"verified payload is {obj.payload!r}")
        kid = obj.headers()["kid"]
        step(f"signed via the local API; joserfc verified it with the JWKS (kid {kid})")
        listed = json.loads(run([str(keyd), "keys", "list", "--json"], cwd=work, env=env))
        active = {k["purpose"] for k in listed if k["state"] == "active"}
        if not {"signing", "encryption"} <= active:
            raise SmokeFailure(f"keys list --json has active keys for {sorted(active)} only")
        step(f"keys list --json: {len(listed)} keys, active for {sorted(active)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise SmokeFailure("keyd serve ignored SIGTERM for 20 s") from None
        log.close()
    if proc.returncode != 0:
        raise SmokeFailure(f"keyd serve exited {proc.returncode} on SIGTERM")
    step("serve stopped cleanly on SIGTERM")


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    root = Path(tempfile.mkdtemp(prefix="keyd-wheel-smoke-"))
    started = time.monotonic()
    try:
        (root / "dist").mkdir()
        (root / "work").mkdir()
        wheel = build(root / "dist")
        keyd = install(wheel, root / "venv")
        # Nothing of the checkout may leak in: no PYTHONPATH, no KEYD_* settings.
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("KEYD_")}
        serve_and_check(keyd, root / "work", env)
    except (SmokeFailure, subprocess.TimeoutExpired, httpx.HTTPError, KeyError) as e:
        print(f"wheel smoke: FAILED: {e}", flush=True)
        print(f"wheel smoke: files kept in {root}", flush=True)
        return 1
    if keep:
        step(f"files kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wheel smoke: OK ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
