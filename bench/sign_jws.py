"""Benchmark: POST /v1/sign/jws over loopback on the local backend (workers
"auto"), driven by wrk, against `openssl speed -multi 2 rsa2048` in the same run.

    .venv/bin/python bench/sign_jws.py [--seconds 5] [--connections 16]

Prints sign/s, p50/p99 latency, each worker's resident memory and the ratio
keyd/openssl (target 0.6, issue 13).  Also the ceiling: a bare uvicorn app
that parses the same body and signs it with pyca/cryptography, nothing else
(bench/_bare_app.py), on as many workers, and its own ratio to openssl: what
any Python server on uvicorn reaches here, and keyd's share of it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402 - after the path fix
    SIGN_BODY,
    arguments,
    bare_uvicorn,
    bench_daemon,
    openssl_rsa2048,
    report,
    worker_rss_mib,
    wrk,
)


def main() -> None:
    args = arguments(__doc__)

    # The reference is taken before and after keyd's run and averaged, so a
    # change in the machine's load during the run moves both sides alike.
    before = openssl_rsa2048(min(args.seconds, 3))
    with tempfile.TemporaryDirectory(prefix="keyd-bench-") as folder, \
            bench_daemon(Path(folder)) as (daemon, token):
        url = daemon.api_url + "/v1/sign/jws"
        wrk(url, token, 1, args.connections)  # warm-up
        result = wrk(url, token, args.seconds, args.connections)
        rss = worker_rss_mib(daemon)
    ceiling = bare_uvicorn("sign_app", "/v1/sign/jws", args.seconds, args.connections,
                           body=SIGN_BODY)
    reference = (before + openssl_rsa2048(min(args.seconds, 3))) / 2
    report("POST /v1/sign/jws (local backend, RSA-2048 PS256)", result,
           "openssl_speed_multi2_rsa2048_per_second", reference, 0.6,
           connections=args.connections, worker_rss_mib=rss,
           bare_sign_app=ceiling,
           bare_sign_app_ratio=round(ceiling["per_second"] / reference, 3),
           share_of_bare_sign_app=round(result["per_second"] / ceiling["per_second"], 3))


if __name__ == "__main__":
    main()
