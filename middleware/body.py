"""Reading a request's whole body before it goes on, for the hops that must look into it first (a
key's model allow-list, a budget's or a tokens-per-minute limit's estimate), and handing it on.

The body is bounded by ``MAX_REQUEST_BYTES``: a declared length over it is refused before anything
is read, and the count of what arrives is checked chunk by chunk. It is handed on in the request's
info (``RequestInfo.body``), where the next hop that needs it and the relay find it: read once, and
a body that came in one message is passed on as that very object, never copied.
"""

from __future__ import annotations

from starlette.types import Receive, Scope

from service.core.errors import PayloadTooLarge
from service.core.request import RequestInfo


class ClientLeft(Exception):
    """The client disconnected before its body was complete."""


def too_large(max_body: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body exceeds the gateway's limit of {max_body} bytes.")


async def read_body(scope: Scope, receive: Receive, max_body: int) -> bytes:
    """The whole request body, at most ``max_body`` bytes (over: 413, before reading it when its
    length says so); ``ClientLeft`` when the client disconnects first."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > max_body:
            raise too_large(max_body)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise too_large(max_body)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def whole_body(info: RequestInfo, scope: Scope, receive: Receive, max_body: int) -> bytes:
    """The request's whole body: as a hop before read it, else read now (``read_body``) and kept in
    ``info`` for the hops after and the relay."""
    body = info.body
    if body is None:
        body = info.body = await read_body(scope, receive, max_body)
    return body
