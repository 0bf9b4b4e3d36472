"""The wheel smoke test (.ci/run): keyd as an operator installs it.

Builds the sdist and, from it, the wheel (so both must carry migrations/ and
policies/), installs the wheel alone into a fresh venv outside the checkout,
then from an empty folder: `keyd init`, `keyd client add`, `keyd serve`, the
JWKS fetched over HTTP, a JWS signed through the local API and verified with
the fetched JWKS by an independent library (joserfc, run from the checkout's
venv, not the fresh one), `keyd keys list --json`, and a clean stop.

Then the production walk-through of systemd/README.md as far as a machine
without systemd as PID 1 allows: systemd/install.sh installs the same wheel
(with its dependencies) under a temp root; the installed binary, given the
master key the way systemd's LoadCredential= does ($CREDENTIALS_DIRECTORY),
runs `init` in production mode, `csr` for each key, `cert import KID
/dev/stdin` with a test CA's chain, `status`, and `serve`, whose JWKS then
holds the CA-issued keys.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from joserfc import jws
from joserfc.jwk import KeySet

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fixtures.certs import FakeCA  # noqa: E402 - the checkout's test CA, after the path is set

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
    with serving(keyd, work, env, work / "var") as addresses:
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
    step("serve stopped cleanly on SIGTERM")


@contextmanager
def serving(keyd: Path, work: Path, env: dict[str, str], data_dir: Path,
            config: list[str] | None = None) -> Iterator[dict[str, str]]:
    """`keyd serve` until the block ends, then SIGTERM and a clean exit."""
    endpoints = data_dir / "endpoints.json"
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([str(keyd), *(config or []), "serve"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not endpoints.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SmokeFailure("keyd serve did not start:\n" +
                                   (work / "serve.log").read_text()[-3000:])
            time.sleep(0.1)  # readiness poll
        yield json.loads(endpoints.read_text())
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


def production(wheel: Path, root: Path, env: dict[str, str]) -> None:
    """systemd/README.md's walk-through, under a temp root, without systemd."""
    out = run(["sh", str(REPO / "systemd" / "install.sh"), "--root", str(root), str(wheel)],
              cwd=root.parent, env={**env, "PYTHON": sys.executable})
    if "keyd-admin init" not in out:
        raise SmokeFailure(f"install.sh did not name the next step:\n{out}")
    keyd = root / "usr/local/bin/keyd"
    # The installed template, filled in as the operator does (step 3), with the
    # unit's directories moved under the root.
    config = root / "etc/keyd/config.toml"
    text = config.read_text()
    for old, new in (('client_id = ""', 'client_id = "smoke-prod-0001"'),
                     ('organisation = ""', 'organisation = "Smoke Production"'),
                     ('"/var/lib/keyd"', f'"{root}/var/lib/keyd"'),
                     ('"/run/keyd/keyd.sock"', f'"{root}/run/keyd/keyd.sock"'),
                     ('"127.0.0.1:8080"', '"127.0.0.1:0"'), ('"127.0.0.1:8081"', '"127.0.0.1:0"')):
        if old not in text:
            raise SmokeFailure(f"config template lacks {old}")
        text = text.replace(old, new)
    config.write_text(text)
    (root / "run/keyd").mkdir(parents=True)
    # LoadCredential=master-key:keyd.master-key, as keyd-admin and the unit pass it.
    creds = root / "run/credentials/keyd.service"
    creds.mkdir(parents=True)
    shutil.copy(root / "etc/credstore/keyd.master-key", creds / "master-key")
    env = {**env, "CREDENTIALS_DIRECTORY": str(creds)}
    admin = [str(keyd), "--config", str(config)]
    work = root / "var/lib"
    work.mkdir(parents=True, exist_ok=True)

    init = subprocess.run([*admin, "init"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    if init.returncode != 0 or "keyd csr" not in init.stderr:
        raise SmokeFailure(f"production init: {init.stdout}{init.stderr}")
    if (root / "var/lib/keyd/master.key").exists():
        raise SmokeFailure("init made a master.key file although the credential was given")
    waiting = json.loads(run([*admin, "keys", "list", "--json"], cwd=work, env=env))
    if {k["state"] for k in waiting} != {"awaiting_certificate"}:
        raise SmokeFailure(f"after a production init: {waiting}")
    step(f"installed; production init: {len(waiting)} keys await certificates, "
         "master key from the credential")
    ca = FakeCA()
    for key in waiting:
        chain = ca.issue(run([*admin, "csr", key["kid"]], cwd=work, env=env))
        imported = subprocess.run([*admin, "cert", "import", key["kid"], "/dev/stdin"],
                                  cwd=work, env=env, input=chain, capture_output=True,
                                  timeout=120)
        if imported.returncode != 0:
            raise SmokeFailure(f"cert import: {imported.stderr.decode()}")
    status = run([*admin, "status"], cwd=work, env=env)
    if status.count(" active ") != 3:
        raise SmokeFailure(f"status after the imports:\n{status}")
    step("csr, CA, cert import KID /dev/stdin for each key; status: 3 active")
    with serving(keyd, work, env, root / "var/lib/keyd", ["--config", str(config)]) as addresses:
        published = httpx.get(f"http://{addresses['public']}/jwks", timeout=10).json()["keys"]
    if len(published) != 2 or any(len(k["x5c"]) != 2 for k in published):
        raise SmokeFailure(f"production JWKS: {published}")
    step("serve: the JWKS holds the CA-issued signing and encryption keys; stopped cleanly")


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
        production(wheel, root / "root", env)
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
