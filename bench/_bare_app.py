"""Reference apps on bare uvicorn (no Starlette, no keyd), run by bench/_common.py.

``app``: answers a fixed JSON body to any request after reading the body
(bench/verify_jws.py's reference: HTTP alone).

``sign_app``: parses the request's JSON body and answers a PS256 JWS of its
``payload`` made with pyca/cryptography and nothing else: no caller, no
policy, no audit (bench/sign_jws.py's ceiling: the most any Python server
on uvicorn signs on this machine, so keyd's ratio reads against it too).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BODY = b'{"valid":true,"kid":"bench"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_PROTECTED = base64.urlsafe_b64encode(b'{"alg":"PS256","kid":"bench"}').rstrip(b"=")


async def _body(receive: Any) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await _body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def sign_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    payload = json.loads(await _body(receive))["payload"]
    encoded = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = _PROTECTED + b"." + encoded.rstrip(b"=")
    signature = _KEY.sign(signing_input, _PSS, hashes.SHA256())
    jws = signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")
    out = b'{"jws":"' + jws + b'","kid":"bench"}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
