"""The reference for bench/verify_jws.py: a bare ASGI app on uvicorn answering
a fixed JSON body to any request (after reading the body), nothing else."""

from __future__ import annotations

from typing import Any

BODY = b'{"valid":true,"kid":"bench"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
