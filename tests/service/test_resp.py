"""The limits' own Redis connection: replies read however they arrive, calls that share one
connection answered in order, a Redis that does not answer or goes away, the URL's database and
password; against the real Redis and against small local servers standing in for a broken one."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from unittest.mock import ANY

import pytest
import redis.asyncio

from service.core.limits.resp import ReplyError, RespConnection, _Incomplete, encode, parse
from tests.redis_server import REDIS_URL, require_redis
from tests.support import wait_until


def test_replies_are_read_whole_or_not_at_all() -> None:
    reply = b"*4\r\n:12\r\n$5\r\nhello\r\n$-1\r\n*1\r\n+OK\r\n"
    assert parse(reply, 0) == ([12, b"hello", None, [b"OK"]], len(reply))
    for cut in range(1, len(reply)):  # any prefix is not a reply yet
        with pytest.raises(_Incomplete):
            parse(reply[:cut], 0)
    error, _ = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, ReplyError) and str(error) == "NOSCRIPT No matching script"
    assert parse(b"*-1\r\n", 0) == (None, 5)
    with pytest.raises(ConnectionError):
        parse(b"?what\r\n", 0)


def test_commands_are_written_in_resp() -> None:
    assert encode("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"


@pytest.fixture
async def lane() -> AsyncIterator[RespConnection]:
    require_redis()
    connection = RespConnection(REDIS_URL, 1.0)
    yield connection
    connection.close()


async def test_calls_sharing_the_connection_get_their_own_replies(lane: RespConnection) -> None:
    calls = [lane.call(encode("ECHO", f"call {n}")) for n in range(50)]  # while it connects
    assert await asyncio.gather(*calls) == [[f"call {n}".encode()] for n in range(50)]
    link = lane._link
    assert link is not None and link.transport is not None
    writes: list[bytes] = []
    write = link.transport.write
    link.transport.write = lambda data: (writes.append(bytes(data)), write(data))[1]  # type: ignore[method-assign]
    calls = [lane.call(encode("ECHO", f"turn {n}")) for n in range(50)]  # in one loop turn, connected
    assert await asyncio.gather(*calls) == [[f"turn {n}".encode()] for n in range(50)]
    # the first finds nothing waiting: written at once; the others leave together at the turn's end
    assert writes == [encode("ECHO", "turn 0"), b"".join(encode("ECHO", f"turn {n}") for n in range(1, 50))]
    writes.clear()
    answers: list[object] = []
    lane.send(encode("ECHO", "released"), answers.append)  # a release: nobody awaits it
    alone = lane.call(encode("ECHO", "alone"))
    assert writes == [encode("ECHO", "released"), encode("ECHO", "alone")]  # at once: only a release waits
    assert await alone == [b"alone"]
    assert answers == [[b"released"]]
    pipelined = await lane.call(encode("PING") + encode("ECHO", "x" * 100_000) + encode("NOSUCHCOMMAND"), 3)
    assert pipelined[:2] == [b"PONG", b"x" * 100_000]  # a reply larger than one read
    assert isinstance(pipelined[2], ReplyError)
    answers: list[object] = []
    lane.send(encode("PING"), answers.append)
    await lane.call(encode("PING"))
    assert answers == [[b"PONG"]]


async def test_the_urls_database_and_password_are_used() -> None:
    require_redis()
    plain = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await plain.execute_command("ACL", "SETUSER", "limits-test", "on", ">secret", "~*", "+@all")
        base = REDIS_URL.rsplit("/", 1)[0].replace("redis://", "redis://limits-test:secret@")
        lane = RespConnection(base + "/3", 1.0)
        try:
            await lane.call(encode("SET", "resp-test-db", "three"))
            assert await plain.execute_command("SELECT", 3) and await plain.get("resp-test-db") == b"three"
            await plain.delete("resp-test-db")
        finally:
            lane.close()
        refused = RespConnection(base.replace(":secret@", ":wrong@") + "/0", 1.0)
        with pytest.raises(ReplyError):
            await refused.call(encode("PING"))
        refused.close()
    finally:
        await plain.execute_command("SELECT", 0)
        await plain.execute_command("ACL", "DELUSER", "limits-test")
        await plain.aclose()


class StandIn:
    """A local server standing in for a broken Redis; every connection it took is closed at the end."""

    def __init__(self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.handle = handle
        self.writers: list[asyncio.StreamWriter] = []
        self.done = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.handle(reader, writer)
        await self.done.wait()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self.server.close()
        await self.server.wait_closed()


async def test_a_redis_that_does_not_answer_fails_the_calls_in_time() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)

    async with StandIn(silent) as url:
        lane = RespConnection(url, 0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await lane.call(encode("PING"))
        assert 0.3 <= loop.time() - started < 1.5
        assert not lane.connected
        lane.close()


async def test_a_connection_lost_fails_its_calls_and_the_next_call_reconnects() -> None:
    connections = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(100)
        if connections == 1:
            writer.close()  # gone without an answer
            return
        writer.write(b"+PONG\r\n:1")  # an answer, then the start of one nobody asked for
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"\r\n")
        await writer.drain()

    async with StandIn(flaky) as url:
        lane = RespConnection(url, 1.0)
        with pytest.raises(ConnectionError):
            await lane.call(encode("PING"))
        assert await lane.call(encode("PING")) == [b"PONG"]
        await asyncio.sleep(0.2)  # the unasked-for reply ends the connection
        assert not lane.connected
        lane.close()


async def test_a_connection_closed_while_it_opens_is_not_left_open() -> None:
    """``close()`` (the gateway stopping) while a connection is being set up: the call waiting on it
    fails, the connection made is closed, not kept, and later calls do not open another."""
    asked = asyncio.Event()
    answer = asyncio.Event()
    closed_by_client = asyncio.Event()

    async def slow_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # AUTH
        asked.set()
        await answer.wait()
        writer.write(b"+OK\r\n")
        await writer.drain()
        if await reader.read(100) == b"":
            closed_by_client.set()

    async with StandIn(slow_hello) as url:
        lane = RespConnection(url.replace("redis://", "redis://:secret@"), 5.0)
        waiting = asyncio.ensure_future(lane.call(encode("PING")))
        await asyncio.wait_for(asked.wait(), 5)
        lane.close()
        answer.set()
        with pytest.raises(ConnectionError, match="closed while it opened"):
            await waiting
        await asyncio.wait_for(closed_by_client.wait(), 5)
        assert lane._link is None and not lane.connected
        with pytest.raises(ConnectionError, match="closed"):
            await lane.call(encode("PING"))


async def test_a_reply_that_never_ends_fails_the_call_instead_of_growing() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"$100000000\r\n")  # a bulk string of 100 MB announced, then sent on and on
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                writer.write(b"x" * 65_536)
                await writer.drain()

    async with StandIn(endless) as url:
        lane = RespConnection(url, 5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionError, match="over 1048576 bytes"):
            await lane.call(encode("PING"))
        assert loop.time() - started < 2.5 and not lane.connected  # at the bound, not at the timeout
        lane.close()


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    socket = tmp_path / "redis.sock"
    command = [binary, "--port", "0", "--unixsocket", str(socket), "--save", "", "--dir", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_until(socket.exists, 10, "redis-server's socket")
        lane = RespConnection(f"unix://{socket}?db=2", 1.0)
        assert await lane.call(encode("SET", "k", "v") + encode("CLIENT", "INFO"), 2) == [b"OK", ANY]
        assert b" db=2 " in (await lane.call(encode("CLIENT", "INFO")))[0]
        lane.close()
    finally:
        server.kill()
        server.wait(10)


def test_a_tls_url_is_read_as_redis_py_reads_it() -> None:
    checked = RespConnection("rediss://cache.example:6380/0", 1.0)
    assert checked.ssl is not None and checked.ssl.verify_mode == ssl.CERT_REQUIRED and checked.port == 6380
    unchecked = RespConnection("rediss://cache.example/0?ssl_cert_reqs=none", 1.0)
    assert unchecked.ssl is not None and unchecked.ssl.verify_mode == ssl.CERT_NONE
