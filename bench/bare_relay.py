"""The bench's reference: the floor of this stack.

uvicorn (uvloop, httptools) + a raw ASGI callable + one aiohttp session, relaying method, path,
headers and body to ``UPSTREAM_URL``: no auth, no metadata, no logs, no limits.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8788")
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            else:
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k != b"host"]
    url = UPSTREAM + scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        url += "?" + scope["query_string"].decode("latin-1")
    assert _session is not None
    async with _session.request(scope["method"], url, headers=headers, data=body or None) as response:
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (k, v) for k, v in response.raw_headers if k.lower() not in (b"transfer-encoding", b"connection")
                ],
            }
        )
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
