"""The relay's upstream client: aiohttp's own protocol and C response parser, driven directly.

``aiohttp.ClientSession.request`` builds, per request, a ``ClientRequest`` and a ``ClientResponse``,
a multidict of headers, a yarl URL, a payload object, a writer, trace and cookie plumbing and a
timer: about half of what a bare relay costs per request. The relay needs none of it: it forwards
bytes it already holds, never follows redirects, keeps no cookies and has its own deadline
(``providers.watch``). So it speaks HTTP/1.1 itself over aiohttp's ``ResponseHandler`` — the same
protocol, C parser (``HttpResponseParser``), ``StreamReader`` payload and error classes the session
uses — and keeps its own keep-alive pool per origin:

- the request head is one ``bytes`` join of headers that are already bytes, sent with a body that
  came in one piece in a single write, made at the end of the loop's turn with the turn's other
  writes while other requests run (``service.core.writes``); a body still arriving is streamed (by its declared
  ``content-length``, else chunked) by a task of its own, as aiohttp does, so an early answer is read;
- a connection goes back to the pool only after a response read to its end that leaves it reusable
  (``ResponseHandler.should_close``); one idle longer than ``keepalive`` seconds is closed, and at
  most ``limit`` connections are in use at once (the next requests wait for one, in turn);
- as aiohttp's connector does: addresses are looked up once per ``DNS_TTL_SECONDS``, tried with
  Happy Eyeballs, and an idempotent request whose body is in hand is sent once more on a new
  connection when a kept-alive one turns out to have been closed before it answered anything;
- connecting raises ``OSError`` (refused, unreachable, TLS), a lost connection aiohttp's
  ``ClientError`` subclasses: what the relay already tells apart.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohappyeyeballs
from aiohttp import ClientError, ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from service.core.writes import TurnWrites, turn_writes

MAX_LINE = MAX_FIELD = 8190  # aiohttp's own limits for a status line and a header
MAX_HEADERS = 128
_BODYLESS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_SWEEP_SECONDS = 5.0
_UNSAFE_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
DNS_TTL_SECONDS = 300.0
HAPPY_EYEBALLS_DELAY = 0.25  # aiohttp's: the next address is tried if the first has not answered by then


AddressInfo = tuple[int, int, int, str, tuple[Any, ...]]
MAX_ORIGINS = 256


class RequestTargetError(ValueError):
    """An upstream URL or request line that cannot be sent as HTTP/1.1."""


class UpstreamProtocolError(ClientError):
    """The upstream's answer is not HTTP/1.1 (as aiohttp's ``ClientResponseError`` for the session)."""


class Origin(NamedTuple):
    """One scheme://host:port: the pool keeps idle connections per origin (a tuple: hashed and
    compared in C at each request's two pool lookups, where a frozen dataclass runs Python)."""

    host: str
    port: int
    tls: bool
    host_header: bytes


@dataclass(frozen=True, slots=True)
class Target:
    origin: Origin
    path: bytes
    """The request target as sent: path and query, already encoded."""


def target(url: str) -> Target:
    """Where ``url`` (absolute, already percent-encoded) is sent; callers keep it per path. The host
    is sent as aiohttp's session sent it: lower case, IDNA-encoded, its port only when not the
    scheme's default, an IPv6 literal in brackets; a byte outside ASCII in the path is percent-encoded."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestTargetError(f"not an http(s) URL: {parts.scheme}://…")
    tls = parts.scheme == "https"
    default = 443 if tls else 80
    try:
        port = parts.port or default
        host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise RequestTargetError(f"not a valid host and port: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = ((parts.path or "/") + ("?" + parts.query if parts.query else "")).encode()
    path = _NON_ASCII.sub(lambda found: b"%%%02X" % found[0][0], path)
    return Target(Origin(host, port, tls, host_header.encode("ascii")), _checked(path))


class UpstreamResponse:
    """What the relay reads of an upstream answer: status, raw headers, the body stream."""

    __slots__ = ("_pool", "_writer", "content", "origin", "protocol", "raw_headers", "status")

    def __init__(
        self,
        pool: ConnectionPool,
        origin: Origin,
        protocol: ResponseHandler,
        status: int,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        content: StreamReader,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._pool: ConnectionPool | None = pool
        self.origin = origin
        self.protocol = protocol
        self.status = status
        self.raw_headers = raw_headers
        self.content = content
        self._writer = writer

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it can be reused."""
        self._end(reuse=True)

    def close(self) -> None:
        """The body was not read to its end: the connection cannot carry another request."""
        self._end(reuse=False)

    def _end(self, reuse: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        writer = self._writer
        if writer is not None and not writer.done():  # the upstream answered before the body was sent
            writer.cancel()
            reuse = False
        pool.give_back(self.origin, self.protocol, reuse)


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to the upstreams, one list of idle ones per origin.

    ``limit`` bounds the connections in use (as aiohttp's connector does); idle ones are closed
    after ``keepalive`` seconds.
    """

    def __init__(self, *, limit: int = 1024, keepalive: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self.busy = 0
        """Slots taken: connections carrying a request, or being opened for one."""
        self._idle: dict[Origin, list[tuple[ResponseHandler, float]]] = {}
        """Idle connections per origin, the most recently used last."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._addresses: dict[Origin, tuple[float, list[AddressInfo]]] = {}
        """Each origin's addresses (``getaddrinfo``) and until when they hold."""
        self._tls = tls
        """How ``https`` upstreams are verified: the system's CA store unless given."""
        self._next_sweep = 0.0
        self._closed = False
        self._writes: TurnWrites | None = None

    async def request(
        self,
        method: str,
        target: Target,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        declared_length: bytes | None,
    ) -> UpstreamResponse:
        """Send one request and wait for the response's status and headers (never its body).

        An idempotent request whose body is in hand is sent once more, on a new connection, when a
        kept-alive connection turns out to have been closed by the upstream before it answered
        anything (as aiohttp's session does)."""
        path = target.path
        if query:
            path = _checked(path + (b"&" if path.find(b"?") >= 0 else b"?") + query)
        verb = method.encode("ascii")
        head = [verb, b" ", path, b" HTTP/1.1\r\nHost: ", target.origin.host_header, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        in_hand = isinstance(body, bytes | None)
        if isinstance(body, bytes | None):
            if body:
                head += (b"Content-Length: ", b"%d" % len(body), b"\r\n")
            elif verb not in _BODYLESS:
                head.append(b"Content-Length: 0\r\n")
        elif declared_length is not None:
            head += (b"Content-Length: ", declared_length, b"\r\n")
        else:
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        if isinstance(body, bytes) and body:
            head.append(body)
        data = b"".join(head)

        origin = target.origin
        await self._slot()
        may_retry = in_hand and verb in _IDEMPOTENT
        fresh = False
        while True:
            try:
                protocol, reused = await self._connection(origin, fresh)
            except BaseException:
                self._free_slot()
                raise
            writer: asyncio.Task[None] | None = None
            try:
                head_only = verb == b"HEAD"
                # a kept-alive connection's parser read its last answer to the end and goes on with
                # the next, as parsers do on a connection (a new one costs ~9k instructions); a
                # new connection, and a change to or from HEAD (answers without a body), get a new one
                if not reused or protocol._skip_payload != head_only:  # aiohttp is pinned (pyproject)
                    protocol.set_response_params(
                        skip_payload=head_only,
                        read_until_eof=True,  # a body without length or chunks ends with the connection
                        auto_decompress=False,
                        max_line_size=MAX_LINE,
                        max_field_size=MAX_FIELD,
                        max_headers=MAX_HEADERS,
                    )
                transport = protocol.transport
                assert transport is not None
                writes = self._writes
                if writes is None:
                    writes = self._writes = turn_writes(asyncio.get_running_loop())
                if in_hand and (writes.held or len(writes.tasks) > 1):
                    writes.write(transport, data)  # with the turn's other writes (service.core.writes)
                else:  # alone, or the body's own task writes next
                    transport.write(data)
                if not isinstance(body, bytes | None):
                    writer = asyncio.ensure_future(_send_body(protocol, body, chunked=declared_length is None))
                while True:
                    try:
                        message, payload = await protocol.read()
                    except HttpProcessingError as exc:
                        raise UpstreamProtocolError(exc.message) from exc
                    if not 100 <= message.code < 200 or message.code == 101:
                        break
            except (ServerDisconnectedError, ClientOSError):
                if writer is not None:
                    writer.cancel()
                protocol.close()
                if not (may_retry and reused):
                    self._free_slot()
                    raise
                may_retry, fresh = False, True  # once, on a new connection
                continue
            except BaseException:
                if writer is not None:
                    writer.cancel()
                self.give_back(origin, protocol, reuse=False)
                raise
            return UpstreamResponse(self, origin, protocol, message.code, message.raw_headers, payload, writer)

    async def _slot(self) -> None:
        """Wait for one of the ``limit`` slots, in turn: a freed slot goes to the longest waiting."""
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved when a slot is handed over (still counted in busy)
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self._free_slot()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: busy stays
                return
        self.busy -= 1

    async def _connection(self, origin: Origin, fresh: bool) -> tuple[ResponseHandler, bool]:
        """A connection to ``origin`` for a request holding a slot, and whether it was kept alive
        from an earlier request: the most recently used idle one, unless ``fresh``, else a new one."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        idle = self._idle.get(origin)
        while idle and not fresh:
            protocol, since = idle.pop()
            # a connection the upstream closed, or sent something unasked on, while it was idle is not used
            if now - since < self.keepalive and protocol.is_connected() and not protocol.should_close:
                return protocol, True
            protocol.close()
        loop = asyncio.get_running_loop()
        infos = await self._resolve(origin, now)
        try:
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
            )
        except OSError:
            self._addresses.pop(origin, None)  # looked up again next time: the addresses may have moved
            raise
        tls = self._tls_context() if origin.tls else None
        try:
            _, protocol = await loop.create_connection(
                lambda: ResponseHandler(loop), sock=sock, ssl=tls, server_hostname=origin.host if tls else None
            )
        except BaseException:
            sock.close()
            raise
        return protocol, False

    async def _resolve(self, origin: Origin, now: float) -> list[AddressInfo]:
        """The origin's addresses, looked up at most every ``DNS_TTL_SECONDS``."""
        cached = self._addresses.get(origin)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.get_running_loop().getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        infos: list[AddressInfo] = [(int(a), int(b), c, d, tuple(e)) for a, b, c, d, e in found]
        if len(self._addresses) >= MAX_ORIGINS:
            self._addresses.clear()
        self._addresses[origin] = (now + DNS_TTL_SECONDS, infos)
        return infos

    def give_back(self, origin: Origin, protocol: ResponseHandler, reuse: bool) -> None:
        """A busy connection is done with: kept idle when it can carry another request, else closed."""
        if reuse and not self._closed and not protocol.should_close and protocol.is_connected():
            self._idle.setdefault(origin, []).append((protocol, time.monotonic()))
        else:
            protocol.close()
        self._free_slot()

    def _sweep(self, now: float) -> None:
        """Close the connections idle too long (the upstream would close them soon anyway)."""
        self._next_sweep = now + _SWEEP_SECONDS
        for origin, idle in self._idle.items():
            kept = []
            for protocol, since in idle:
                if now - since < self.keepalive and protocol.is_connected():
                    kept.append((protocol, since))
                else:
                    protocol.close()
            self._idle[origin] = kept

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def close(self) -> None:
        """Close the idle connections; the busy ones close as their responses end."""
        self._closed = True
        for idle in self._idle.values():
            for protocol, _ in idle:
                protocol.close()
        self._idle.clear()


def _checked(target: bytes) -> bytes:
    """A request target cannot hold whitespace or control characters (they would split the request line)."""
    if _UNSAFE_TARGET.search(target):
        raise RequestTargetError("the request target holds whitespace or control characters")
    return target


async def _send_body(protocol: ResponseHandler, body: AsyncIterator[bytes], *, chunked: bool) -> None:
    """Stream a body still arriving from the client; a failure is set on the protocol, so the
    response read fails with it (as aiohttp's own writer does)."""
    try:
        async for chunk in body:
            transport = protocol.transport
            if transport is None:
                return
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if protocol.writing_paused:
                await protocol._drain_helper()
        if chunked and protocol.transport is not None:
            protocol.transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        protocol.set_exception(exc)
