"""Benchmark: POST /v1/decrypt/jwe (RSA-OAEP-256 + A256GCM) on the local
backend (workers "auto"), driven by wrk, against `openssl speed -multi 2
rsa2048` (one RSA private-key operation, as an OAEP decryption is) in the same run.

    .venv/bin/python bench/decrypt_jwe.py [--seconds 5] [--connections 16]

Target ratio 0.55 (issue 13).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from joserfc import jwe  # noqa: E402 - after the path fix
from joserfc.jwk import KeySet  # noqa: E402

from bench._common import (  # noqa: E402
    arguments,
    bench_daemon,
    openssl_rsa2048,
    report,
    worker_rss_mib,
    wrk,
)


def main() -> None:
    args = arguments(__doc__)

    before = openssl_rsa2048(min(args.seconds, 3))
    with tempfile.TemporaryDirectory(prefix="keyd-bench-jwe-") as folder, \
            bench_daemon(Path(folder)) as (daemon, token):
        with daemon.public() as public:
            keys = KeySet.import_key_set(public.get("/jwks").json())
        key = next(k for k in keys.keys if k.get("use") == "enc")
        compact = jwe.encrypt_compact(
            {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": key.kid},
            b'{"consent": "bench", "amount": "10.00"}', key,
            algorithms=["RSA-OAEP-256", "A256GCM"])
        body = json.dumps({"jwe": compact})
        url = daemon.api_url + "/v1/decrypt/jwe"
        wrk(url, token, 1, args.connections, body=body)  # warm-up
        result = wrk(url, token, args.seconds, args.connections, body=body)
        rss = worker_rss_mib(daemon)
    reference = (before + openssl_rsa2048(min(args.seconds, 3))) / 2
    report("POST /v1/decrypt/jwe (local backend, RSA-OAEP-256 + A256GCM)", result,
           "openssl_speed_multi2_rsa2048_per_second", reference, 0.55,
           connections=args.connections, worker_rss_mib=rss)


if __name__ == "__main__":
    main()
