"""Transport deployment: hand the active transport key to the TLS terminator.

When the active transport key is not the one on disk, write its certificate
chain and (where the backend can export it) its private key to the configured
paths, each atomically (a temporary file in the same folder, fsync, rename)
and born 0600, then run the reload command.  The check is "does the file on
disk hold the active chain?", answered from the files themselves, so it is
idempotent and a crash at any point is repaired by the next run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keyd.config import TransportDeploySettings
from keyd.errors import KeydError

log = logging.getLogger("keyd.deploy")

RELOAD_TIMEOUT = 60.0


@dataclass(frozen=True)
class Material:
    kid: str
    chain_pem: bytes
    key_pem: bytes | None  # None where the backend cannot export it


def needed(settings: TransportDeploySettings, material: Material) -> bool:
    """Is anything on disk different from what should be there?"""
    if settings.cert_path is None:
        return False
    if _read(settings.cert_path) != material.chain_pem:
        return True
    return (settings.key_path is not None and material.key_pem is not None
            and _read(settings.key_path) != material.key_pem)


def deploy(settings: TransportDeploySettings, material: Material) -> None:
    """Write the files and run the reload command; KeydError says what failed."""
    if settings.cert_path is None:
        return
    if settings.key_path is not None and material.key_pem is not None:
        # Key before chain: the chain file is what needed() compares, so a
        # crash between the two writes is redone in full on the next run.
        write_atomic(settings.key_path, material.key_pem)
    write_atomic(settings.cert_path, material.chain_pem)
    if settings.reload_command:
        try:
            # The command is the operator's own config (argv, no shell), never request data.
            result = subprocess.run(list(settings.reload_command), capture_output=True,  # noqa: S603
                                    timeout=RELOAD_TIMEOUT, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise KeydError(f"reload command {settings.reload_command[0]!r} failed: {e}") from e
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise KeydError(f"reload command {settings.reload_command[0]!r} exited "
                            f"{result.returncode}: {tail[0][:200]}")
    log.info("deployed transport key %s to %s", material.kid, settings.cert_path)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # mkstemp creates the file 0600 from the start: the key is never
        # readable by others, not even for an instant.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise KeydError(f"cannot write {path}: {e.strerror}") from e


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
