"""Benchmark: POST /v1/verify/jws of an issuer-signed PS256 message, the
issuer's JWKS cached, on the local backend (workers "auto"), against a bare
uvicorn app on as many workers answering a fixed JSON body, in the same run.

    .venv/bin/python bench/verify_jws.py [--seconds 5] [--connections 16]

Target ratio 0.5 (issue 13): what keyd's seam (auth, policy, strict parsing,
JOSE checks, audit) costs beside HTTP alone.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes  # noqa: E402 - after the path fix
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

from bench._common import (  # noqa: E402
    arguments,
    bare_uvicorn,
    bench_daemon,
    report,
    worker_rss_mib,
    wrk,
)
from tests.fixtures.daemon import StaticServer  # noqa: E402
from tests.fixtures.jose import b64u  # noqa: E402

KID = "bench-issuer-1"


def issuer_message(key: rsa.RSAPrivateKey) -> str:
    header = b64u(json.dumps({"alg": "PS256", "kid": KID}).encode())
    payload = b64u(b'{"consent": "bench", "amount": "10.00"}')
    signature = key.sign(f"{header}.{payload}".encode(),
                         padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                         hashes.SHA256())
    return f"{header}.{payload}.{b64u(signature)}"


def main() -> None:
    args = arguments(__doc__)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    issuer = StaticServer()
    issuer.body = json.dumps({"keys": [{
        "kty": "RSA", "kid": KID, "use": "sig", "alg": "PS256",
        "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}],
    }).encode()
    body = json.dumps({"jws": issuer_message(key), "issuer": "acme"})
    try:
        with tempfile.TemporaryDirectory(prefix="keyd-bench-verify-") as folder, \
                bench_daemon(Path(folder), {"issuers.acme": {"jwks_uri": issuer.url}}
                             ) as (daemon, token):
            url = daemon.api_url + "/v1/verify/jws"
            wrk(url, token, 1, args.connections, body=body)  # warm-up; fills the JWKS cache
            result = wrk(url, token, args.seconds, args.connections, body=body)
            rss = worker_rss_mib(daemon)
    finally:
        issuer.close()
    reference = bare_uvicorn("app", "/v1/verify/jws", args.seconds, args.connections,
                             body=body)
    report("POST /v1/verify/jws (issuer PS256, JWKS cached)", result,
           "bare_uvicorn_fixed_json_per_second", reference["per_second"], 0.5,
           connections=args.connections, worker_rss_mib=rss, bare_uvicorn=reference)


if __name__ == "__main__":
    main()
