"""Reading a request body within its limits: one reader for the JSON API and
the console's forms."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from keyd.errors import PayloadTooLarge, RequestTimeout


async def read_bytes(request: Request, limit: int, deadline: float) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes.

    Content-Length is checked first, then the stream is counted, so a lying
    Content-Length cannot make us buffer more than the limit; a body that
    trickles in slower than ``deadline`` seconds is refused with 408.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"request body over {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {deadline:g} s") from None
    return b"".join(chunks)
