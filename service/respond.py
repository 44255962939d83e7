"""Sending a gateway error as a complete JSON response on a raw ASGI ``send``."""

from __future__ import annotations

from starlette.types import Send

from service.errors import GatewayError, Shape, render


async def send_error(send: Send, error: GatewayError, shape: Shape, request_id: str) -> None:
    body = render(error, shape, request_id)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
