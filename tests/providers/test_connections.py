"""The relay's upstream client (``providers.connections``) against a real HTTP/1.1 server on a socket:
what goes on the wire, which connections are reused, the pool's bound, and what it refuses."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from providers.connections import ConnectionPool, RequestTargetError, target


class Upstream:
    """A small HTTP/1.1 server: records each request's head and body and the connection it came on,
    answers with ``answer(head)`` (raw bytes), closes a connection when the answer asks to."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes, bytes]] = []
        self.connections = 0
        self.answer = lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.server: asyncio.Server | None = None
        self.url = ""
        self.tasks: list[asyncio.Task[None]] = []
        self.unasked = b""
        self.drop_second = False
        """Close a connection, unanswered, when a second request arrives on it (a keep-alive race)."""
        """Sent on a connection a moment after each answer, as an upstream misbehaving would."""

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                lowered = head.lower()
                if b"content-length: " in lowered:
                    length = int(lowered.split(b"content-length: ")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                elif b"transfer-encoding: chunked" in lowered:
                    while True:
                        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                        body += (await reader.readexactly(size + 2))[:-2]
                        if size == 0:
                            break
                self.requests.append((number, head, body))
                if self.drop_second and sum(1 for n, _, _ in self.requests if n == number) == 2:
                    break
                answer = self.answer(head)
                writer.write(answer)
                await writer.drain()
                if self.unasked:
                    await asyncio.sleep(0.05)
                    writer.write(self.unasked)
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        writer.close()


async def read(pool: ConnectionPool, url: str, method: str = "POST", **kwargs: object) -> tuple[int, bytes]:
    """One request through the pool, its body read to the end and the response released."""
    args = {"query": b"", "headers": [], "body": b"{}", "declared_length": None, **kwargs}
    response = await pool.request(method, target(url), **args)  # type: ignore[arg-type]
    body = await response.content.read()
    response.release()
    return response.status, body


async def test_the_request_goes_out_as_received_and_the_connection_is_kept_alive() -> None:
    async with Upstream() as upstream:
        pool = ConnectionPool()
        headers = [(b"content-type", b"application/json"), (b"x-team", b"caf\xc3\xa9")]
        for _ in range(3):
            assert await read(pool, upstream.url + "/v1/chat", query=b"a=1", headers=headers) == (200, b"ok")
        await pool.close()
    assert upstream.connections == 1
    assert [number for number, _, _ in upstream.requests] == [1, 1, 1]
    _, head, body = upstream.requests[0]
    host = upstream.url.removeprefix("http://").encode()
    assert head == (
        b"POST /v1/chat?a=1 HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"content-type: application/json\r\nx-team: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\n"
    )
    assert body == b"{}"


async def test_a_body_still_arriving_is_streamed_chunked_or_by_its_declared_length() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b'{"a":', b"1}"):
            await asyncio.sleep(0)
            yield part

    async with Upstream() as upstream:
        pool = ConnectionPool()
        assert await read(pool, upstream.url + "/x", body=parts()) == (200, b"ok")
        assert await read(pool, upstream.url + "/x", body=parts(), declared_length=b"7") == (200, b"ok")
        await pool.close()
    (_, chunked, first), (_, sized, second) = upstream.requests
    assert b"Transfer-Encoding: chunked\r\n" in chunked and first == b'{"a":1}'
    assert b"Content-Length: 7\r\n" in sized and second == b'{"a":1}'


async def test_bodiless_methods_send_no_length_and_a_head_answer_has_no_body() -> None:
    async with Upstream() as upstream:
        upstream.answer = lambda head: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + (b"" if head.startswith(b"HEAD") else b"hello")
        )
        pool = ConnectionPool()
        assert await read(pool, upstream.url + "/m", "GET", body=None) == (200, b"hello")
        assert await read(pool, upstream.url + "/m", "HEAD", body=None) == (200, b"")
        assert await read(pool, upstream.url + "/m", "POST", body=None) == (200, b"hello")
        await pool.close()
    heads = [head for _, head, _ in upstream.requests]
    assert b"Content-Length" not in heads[0] and b"Content-Length" not in heads[1]
    assert b"Content-Length: 0\r\n" in heads[2]
    assert upstream.connections == 1


async def test_an_interim_100_answer_is_skipped() -> None:
    async with Upstream() as upstream:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        upstream.answer = lambda head: interim + b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"
        pool = ConnectionPool()
        assert await read(pool, upstream.url + "/m") == (201, b"x")
        await pool.close()


async def test_one_kept_alive_connection_reads_answers_of_every_framing_in_turn() -> None:
    """A kept-alive connection's parser goes on from one answer to the next: answers sized, chunked
    (with a trailer), empty (204, 304), after an interim 100 and to a HEAD, in any order, each read
    whole and only its own, all on one connection."""
    answers = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", b"first"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n", b"abcde"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", b""),  # to a HEAD: no body follows
        (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", b""),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew", b"new"),
        (b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbad!\r\n0\r\n\r\n", b"bad!"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast", b"last"),
    ]
    methods = ["POST", "GET", "POST", "HEAD", "GET", "POST", "POST", "GET"]
    async with Upstream() as upstream:
        queue = iter(answer for answer, _ in answers)
        upstream.answer = lambda head: next(queue)
        pool = ConnectionPool()
        for method, (answer, body) in zip(methods, answers, strict=True):
            status = int(answer.rsplit(b"HTTP/1.1 ", 1)[1][:3])
            sent = None if method in ("GET", "HEAD") else b"{}"
            assert await read(pool, upstream.url + "/f", method, body=sent) == (status, body)
        await pool.close()
    assert upstream.connections == 1


async def test_a_connection_is_not_reused_after_close_an_unread_body_or_its_keepalive() -> None:
    async with Upstream() as upstream:
        answers = iter(
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na"]
            + [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"] * 5
        )
        upstream.answer = lambda head: next(answers)
        pool = ConnectionPool(keepalive=0.2)
        assert await read(pool, upstream.url) == (200, b"a")  # the upstream closes it
        assert await read(pool, upstream.url) == (200, b"b")  # a new one
        response = await pool.request("POST", target(upstream.url), b"", [], b"{}", None)
        response.close()  # its body not read: closed, not kept
        assert pool.busy == 0
        assert await read(pool, upstream.url) == (200, b"b")
        assert upstream.connections == 3
        await asyncio.sleep(0.3)  # idle longer than keepalive
        assert await read(pool, upstream.url) == (200, b"b")
        assert upstream.connections == 4
        await pool.close()


async def test_at_its_limit_the_pool_makes_the_next_request_wait_for_a_connection() -> None:
    async with Upstream() as upstream:
        pool = ConnectionPool(limit=1)
        first = await pool.request("POST", target(upstream.url), b"", [], b"{}", None)
        second = asyncio.ensure_future(read(pool, upstream.url))
        await asyncio.sleep(0.05)
        assert not second.done() and pool.busy == 1
        assert await first.content.read() == b"ok"
        first.release()
        assert await second == (200, b"ok")
        assert upstream.connections == 1  # the released connection carried the waiting request
        # a request that gives up waiting leaves the pool's count as it was
        held = await pool.request("POST", target(upstream.url), b"", [], b"{}", None)
        waiting = asyncio.ensure_future(read(pool, upstream.url))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held.close()
        assert pool.busy == 0
        assert await read(pool, upstream.url) == (200, b"ok")
        await pool.close()


async def test_a_refused_connection_and_a_lost_one_raise_what_the_relay_tells_apart() -> None:
    async with Upstream() as upstream:
        url = upstream.url
        upstream.answer = lambda head: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\ncut"
        pool = ConnectionPool()
        response = await pool.request("POST", target(url), b"", [], b"{}", None)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()
        response.close()
    with pytest.raises(OSError):
        await pool.request("POST", target(url), b"", [], b"{}", None)
    assert pool.busy == 0
    await pool.close()


def test_urls_and_query_strings_that_cannot_make_a_request_line_are_refused() -> None:
    assert target("https://gateway.ai.cloudflare.com/v1/a/b/openai/chat?x=1").path == b"/v1/a/b/openai/chat?x=1"
    assert target("https://example.com").origin.port == 443
    with pytest.raises(RequestTargetError):
        target("ftp://example.com/x")
    with pytest.raises(RequestTargetError):
        target("http://example.com/a b")


async def test_a_query_with_control_characters_is_refused_before_anything_is_sent() -> None:
    async with Upstream() as upstream:
        pool = ConnectionPool()
        with pytest.raises(RequestTargetError):
            await pool.request("GET", target(upstream.url + "/m?a=1"), b"b=\r\nX: y", [], None, None)
        await pool.close()
    assert upstream.connections == 0 and pool.busy == 0


async def test_an_answer_that_is_not_http_raises_a_client_error() -> None:
    async with Upstream() as upstream:
        upstream.answer = lambda head: b"\x00\x01 not HTTP \xff\r\n\r\n"
        pool = ConnectionPool()
        with pytest.raises(aiohttp.ClientError):
            await pool.request("POST", target(upstream.url), b"", [], b"{}", None)
        assert pool.busy == 0
        await pool.close()


async def test_an_https_upstream_is_reached_over_verified_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *names, *files],
        check=True,
        capture_output=True,
    )
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntls")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "localhost", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = ConnectionPool(tls=trusting)
    assert await read(pool, f"https://localhost:{port}/v1") == (200, b"tls")
    assert heads[0].startswith(b"POST /v1 HTTP/1.1\r\nHost: localhost:%d\r\n" % port)
    with pytest.raises(ssl.SSLError):  # the system's CA store does not know this certificate
        await ConnectionPool().request("POST", target(f"https://localhost:{port}/v1"), b"", [], b"{}", None)
    server.close()
    await pool.close()


async def test_a_connection_the_upstream_wrote_on_while_idle_is_not_reused() -> None:
    async with Upstream() as upstream:
        upstream.unasked = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
        pool = ConnectionPool()
        assert await read(pool, upstream.url) == (200, b"ok")
        await asyncio.sleep(0.2)
        assert await read(pool, upstream.url) == (200, b"ok")  # not the stale answer
        assert upstream.connections == 2
        await pool.close()


async def test_a_body_that_ends_with_the_connection_is_read_whole() -> None:
    async with Upstream() as upstream:
        upstream.answer = lambda head: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length, ends at close"
        pool = ConnectionPool()
        assert await read(pool, upstream.url) == (200, b"no length, ends at close")
        assert pool.busy == 0
        await pool.close()


async def test_an_idempotent_request_is_sent_again_when_a_kept_alive_connection_was_closed() -> None:
    async with Upstream() as upstream:
        upstream.drop_second = True
        pool = ConnectionPool()
        assert await read(pool, upstream.url, "GET", body=None) == (200, b"ok")
        assert await read(pool, upstream.url, "GET", body=None) == (200, b"ok")  # on a new connection
        assert upstream.connections == 2
        # a POST is not sent twice: the client hears of the failure
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await read(pool, upstream.url, "POST")
        assert pool.busy == 0
        await pool.close()


async def test_waiting_requests_get_connections_in_the_order_they_asked() -> None:
    async with Upstream() as upstream:
        pool = ConnectionPool(limit=1)
        served: list[str] = []

        async def one(name: str) -> None:
            await read(pool, upstream.url)
            served.append(name)

        first = await pool.request("POST", target(upstream.url), b"", [], b"{}", None)
        waiting = [asyncio.ensure_future(one(f"waiter-{n}")) for n in range(3)]
        await asyncio.sleep(0.05)
        await first.content.read()
        first.release()
        late = asyncio.ensure_future(one("late"))  # arrives after the slot was freed: still behind them
        await asyncio.gather(*waiting, late)
        assert served == ["waiter-0", "waiter-1", "waiter-2", "late"]
        assert pool.busy == 0
        await pool.close()


def test_the_host_is_sent_as_a_browser_would_name_it() -> None:
    assert target("https://API.Example.COM:443/v1").origin.host_header == b"api.example.com"
    assert target("http://api.example.com:8080/v1").origin.host_header == b"api.example.com:8080"
    assert target("https://bücher.example/v1").origin.host_header == b"xn--bcher-kva.example"
    assert target("http://[::1]:8787/v1").origin.host_header == b"[::1]:8787"
    assert target("https://example.com/é/v1").path == b"/%C3%A9/v1"
    with pytest.raises(RequestTargetError):
        target("http://example.com:99999/")
