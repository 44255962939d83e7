"""``GatewayCycle`` sends what uvicorn's own request-response cycle sends, byte for byte, and refuses
what it refuses (an invalid header name or value: nothing written, the connection closed, as uvicorn
does once a response has started): the same app served by uvicorn's httptools protocol and by the
gateway's, in this process, spoken to over raw sockets."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import protocol as gateway_protocol
from service.protocol import GatewayHttpProtocol
from tests.support import free_port

HEADERS: dict[str, list[tuple[bytes, bytes]]] = {
    "/length": [(b"Content-Type", b"application/json"), (b"content-length", b"11"), (b"X-Tab", b"a\tb")],
    "/chunked": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
    "/coded": [(b"transfer-encoding", b"chunked"), (b"x-odd-but-valid", b"\x80\xff caf\xc3\xa9")],
    "/close": [(b"content-length", b"11"), (b"Connection", b"keep-alive, Close")],
    "/empty": [],
    "/204": [(b"x-a", b"")],
    "/bad-value": [(b"content-length", b"11"), (b"x-split", b"1\r\nx-injected: yes")],
    "/bad-nul": [(b"content-length", b"11"), (b"x-nul", b"a\x00b")],
    "/bad-name": [(b"content-length", b"11"), (b"x bad", b"1")],
    "/bad-colon": [(b"content-length", b"11"), (b"x:injected", b"1")],
}


CYCLES: dict[int, str] = {}
"""The class of the cycle that served each server port."""


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    CYCLES[scope["server"][1]] = type(send.__self__).__name__  # type: ignore[attr-defined]
    path = scope["path"]
    status = 204 if path == "/204" else 200
    await send({"type": "http.response.start", "status": status, "headers": HEADERS[path]})
    if path in ("/chunked", "/coded", "/empty"):
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await send({"type": "http.response.body", "body": b" world", "more_body": False})
    elif path == "/204":
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.body", "body": b"hello world"})


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, int]]:
    before = gateway_protocol._State.limits  # this process's: put back afterwards
    gateway_protocol.configure(gateway_protocol.Limits(64 * 1024, 16 * 1024, 10.0, 1000))
    ports: dict[str, int] = {}
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    for name, protocol in (("uvicorn", HttpToolsProtocol), ("gateway", GatewayHttpProtocol)):
        port = ports[name] = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, http=protocol, access_log=False, log_level="critical", date_header=False
        )
        server = uvicorn.Server(config)
        running.append((server, asyncio.create_task(server.serve())))
        while not server.started:
            await asyncio.sleep(0.01)
    yield ports
    for server, task in running:
        server.should_exit = True
        await task
    gateway_protocol._State.limits = before


async def exchange(port: int, method: str, path: str) -> tuple[bytes, bool]:
    """Everything the server sent for one request, and whether it closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    data = b""
    closed = False
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 0.25)
        except TimeoutError:
            break
        if not chunk:
            closed = True
            break
        data += chunk
    writer.close()
    return data, closed


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", list(HEADERS))
async def test_the_gateways_cycle_sends_what_uvicorns_sends(servers: dict[str, int], method: str, path: str) -> None:
    theirs = await exchange(servers["uvicorn"], method, path)
    ours = await exchange(servers["gateway"], method, path)
    assert ours == theirs
    assert (CYCLES[servers["uvicorn"]], CYCLES[servers["gateway"]]) == ("RequestResponseCycle", "GatewayCycle")
    head = ours[0].split(b"\r\n\r\n", 1)[0]
    if path.startswith("/bad"):  # refused before anything of it was written: the connection is closed
        assert ours == (b"", True)
    else:
        assert re.match(rb"HTTP/1\.1 20[04] ", head)
        assert head == head.split(b"\r\n", 1)[0] + b"".join(
            b"\r\n" + line.split(b":", 1)[0].lower() + b":" + line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
        )  # names lowercased, values as sent
    if path == "/close":
        assert ours[1]
