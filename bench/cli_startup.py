"""How long the `keyd` command takes to start, as a ratio to `python -c pass`.

Both are measured in the same run on the same interpreter (the median of
several runs each), so the ratio says what keyd's imports cost whatever the
machine: `keyd --help` should stay a small multiple of a bare interpreter.
`keyd status` reads a real (SQLite) store made by `keyd init` in a temp folder.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 15
CONFIG = '[keyd]\nclient_id = "bench-client"\norganisation = "Bench"\n'


def median_seconds(argv: list[str], cwd: Path) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keyd-bench-cli-") as folder:
        cwd = Path(folder)
        (cwd / "config.toml").write_text(CONFIG)
        keyd = [sys.executable, "-m", "keyd.cli"]
        subprocess.run([*keyd, "init"], cwd=cwd, check=True, capture_output=True)
        bare = median_seconds([sys.executable, "-c", "pass"], cwd)
        print(f"python -c pass  {bare * 1000:7.1f} ms  (reference, median of {RUNS})")
        for name, args in (("keyd --help", ["--help"]), ("keyd status", ["status"])):
            took = median_seconds([*keyd, *args], cwd)
            print(f"{name:<14} {took * 1000:7.1f} ms  = {took / bare:4.1f} x python -c pass")


if __name__ == "__main__":
    main()
