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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service import protocol as gateway_protocol
from service.protocol import GatewayCycle, GatewayHttpProtocol
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


MISUSE = ("/longer", "/shorter", "/after", "/body-first")
"""An app breaking the ASGI contract: its server's ``RuntimeError``s, and what reaches the client."""
BIG = 16 * 1024 * 1024
CYCLES: dict[int, str] = {}
"""The class of the cycle that served each server port."""
after_leaving: dict[int, str] = {}
"""What ``send`` did, per server port, for a streamed chunk sent after the client had gone."""


async def misuse(path: str, send: Send) -> None:
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    if path == "/body-first":
        await send({"type": "http.response.body", "body": b"hello"})
        return
    await send(start)
    if path == "/longer":
        await send({"type": "http.response.body", "body": b"hello world"})
    elif path == "/shorter":
        await send({"type": "http.response.body", "body": b"hel"})
    else:
        await send({"type": "http.response.body", "body": b"hello"})
        await send({"type": "http.response.body", "body": b"again"})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    CYCLES[scope["server"][1]] = type(send.__self__).__name__  # type: ignore[attr-defined]
    path = scope["path"]
    if (b"x-echo", b"target") in scope["headers"]:  # the request target as the server read it
        body = repr((scope["path"], scope["raw_path"], scope["query_string"])).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    if path in MISUSE:
        await misuse(path, send)
        return
    if path == "/big":  # a client reading slowly: the writes wait for room (flow control)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        block = bytes(range(256)) * 256
        for _ in range(BIG // len(block)):
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path == "/gone":  # the client leaves after the first chunk: later chunks are dropped quietly
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        try:
            await send({"type": "http.response.body", "body": b"late", "more_body": True})
            after_leaving[scope["server"][1]] = "returned"
        except Exception as exc:
            after_leaving[scope["server"][1]] = type(exc).__name__
        return
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


async def exchange(port: int, method: str, path: str, wait: float = 0.0) -> tuple[bytes, bool]:
    """Everything the server sent for one request (read after ``wait`` seconds), and whether it closed
    the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(wait)
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


TARGETS = [
    "/v1/chat/completions",
    "/a?b=1&c=2",
    "/a?b?c",
    "/a?",
    "/?",
    "/",
    "//x/y",
    "/%7Ea%20b/%2F?x=%20y",
    "/a#frag",
    "/a?b=1#frag",
    '/a{}|^"<>\\b',
    "http://example.test/abs/path?q=1",
    "http://example.test",
    "*",
]


@pytest.mark.parametrize("target", TARGETS)
async def test_the_request_target_is_read_as_uvicorn_reads_it(servers: dict[str, int], target: str) -> None:
    """Path, raw path and query string, from the origin form (split by the gateway's protocol itself)
    and the other forms (read as uvicorn reads them); a target uvicorn refuses is refused alike."""
    answers = []
    for name in ("uvicorn", "gateway"):
        reader, writer = await asyncio.open_connection("127.0.0.1", servers[name])
        writer.write(f"GET {target} HTTP/1.1\r\nhost: x\r\nx-echo: target\r\nconnection: close\r\n\r\n".encode())
        answers.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()
    theirs, ours = answers
    assert ours.split(b"\r\n", 1)[0] == theirs.split(b"\r\n", 1)[0]  # the status line
    if ours.startswith(b"HTTP/1.1 200 "):
        assert ours.split(b"\r\n\r\n", 1)[1] == theirs.split(b"\r\n\r\n", 1)[1]  # the scope's three
    else:  # refused by both (the gateway's 400 is JSON)
        assert ours.startswith(b"HTTP/1.1 400 ") and not target.startswith("/")


@pytest.mark.parametrize("path", MISUSE)
async def test_an_app_breaking_the_protocol_gets_the_same_answer_from_both(servers: dict[str, int], path: str) -> None:
    theirs = await exchange(servers["uvicorn"], "GET", path)
    ours = await exchange(servers["gateway"], "GET", path)
    assert ours == theirs
    if path == "/body-first":  # nothing was started: the server's own 500
        assert ours[0].startswith(b"HTTP/1.1 500 ")
    elif path == "/after":  # the response was whole: the extra message is refused, the response stands
        assert ours[0].endswith(b"\r\n\r\nhello")
    else:  # a body that does not fit its length: the response is cut, the connection closed
        assert ours[1]


async def test_a_large_response_to_a_slow_reader_arrives_whole(servers: dict[str, int]) -> None:
    for name in ("uvicorn", "gateway"):
        data, _ = await exchange(servers[name], "GET", "/big", wait=0.5)
        head, body = data.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding: chunked" in head
        assert len(body) == BIG + (BIG // 65536) * len(b"10000\r\n\r\n") + len(b"0\r\n\r\n"), name
        assert body.endswith(b"\r\n0\r\n\r\n")


async def test_chunks_sent_after_the_client_left_are_dropped_quietly(servers: dict[str, int]) -> None:
    for port in servers.values():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gone HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b"first" in await reader.readuntil(b"first")
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if port in after_leaving:
                break
            await asyncio.sleep(0.02)
    assert after_leaving == {servers["uvicorn"]: "returned", servers["gateway"]: "returned"}


async def closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: float) -> float:
    """Seconds until the server closes this idle connection (reading what it sends meanwhile)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await asyncio.wait_for(reader.read(65536), limit):
        pass
    writer.close()
    return loop.time() - started


async def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    """uvicorn's keep-alive timeout, kept by the gateway's protocol as a deadline its sweep looks
    at (every second here: the sweep runs at most every second, or every quarter of the head timeout)."""
    before = gateway_protocol._State.limits
    gateway_protocol.configure(gateway_protocol.Limits(64 * 1024, 16 * 1024, 10.0, 1000))
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=GatewayHttpProtocol,
        access_log=False,
        log_level="critical",
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # each response starts the timeout again: idle 0.7 s three times, it stays open
            writer.write(b"GET /length HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readuntil(b"hello world")).startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(0.7)
        writer.write(b"GET /length HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await reader.readuntil(b"hello world")).startswith(b"HTTP/1.1 200 ")
        assert 1.0 <= await closed_after(reader, writer, 5) < 2.5
    finally:
        server.should_exit = True
        await task
        gateway_protocol._State.limits = before


def test_the_gateways_cycle_starts_with_every_attribute_uvicorns_has() -> None:
    """``GatewayCycle`` sets uvicorn's state itself (by position, the rest as class attributes): a
    uvicorn that added some would leave the gateway's cycle without it; this says so first."""
    args = ({}, None, None, None, None, False, [], None, False, True, None)
    theirs = RequestResponseCycle(*args)  # type: ignore[arg-type]
    ours = GatewayCycle(*args)  # type: ignore[arg-type]
    for name, value in vars(theirs).items():
        assert getattr(ours, name) == value, name
