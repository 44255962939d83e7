"""One lean connection to Redis for the limits' request path: commands written as they come,
their replies matched in order (RESP pipelining), no pool and no per-command machinery.

Every request under limits makes one script call on the way in; through redis-py's asyncio client
that call cost some 140 µs of the gateway's own CPU on the bench machine (its pool, retry and
observability plumbing, a stream reader and a parser per line), against about 25 µs here, most of
it the two system calls. redis-py stays the client for everything off the request path (state,
seeding, renewals, probes). The URL means the same to both: it is read by redis-py's ``parse_url``.

Concurrent callers share the connection: each call is written at once and waits for its replies
in turn. A call that waits longer than ``timeout`` fails with ``TimeoutError``, and with it the
connection (later replies could no longer be matched): the next call connects anew.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import RedisError

Reply = Any
"""``int``, ``bytes``, ``None``, a ``ReplyError`` or a list of replies."""


class ReplyError(RedisError):
    """An error Redis answered a command with (``NOSCRIPT …``, ``ERR …``)."""


class _Incomplete(Exception):
    pass


def encode(*parts: bytes | str | int) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def parse(data: bytes, at: int) -> tuple[Reply, int]:
    """The reply starting at ``at`` and where the next one starts; ``_Incomplete`` when it has not
    all arrived."""
    end = data.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    kind = data[at]
    if kind == 58:  # :
        return int(data[at + 1 : end]), end + 2
    if kind == 36:  # $
        size = int(data[at + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(data) < stop + 2:
            raise _Incomplete
        return data[end + 2 : stop], stop + 2
    if kind == 42:  # *
        count = int(data[at + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        at = end + 2
        for _ in range(count):
            item, at = parse(data, at)
            items.append(item)
        return items, at
    if kind == 43:  # +
        return data[at + 1 : end], end + 2
    if kind == 45:  # -
        return ReplyError(data[at + 1 : end].decode("utf-8", "replace")), end + 2
    raise ConnectionError(f"Redis sent something that is not RESP (type byte {kind})")


class _Link(asyncio.Protocol):
    """One physical connection; the calls waiting on it, oldest first."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiting: deque[tuple[asyncio.Future[list[Reply]], int, list[Reply], float]] = deque()
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        at = 0
        size = len(data)
        waiting = self.waiting
        try:
            while at < size:
                reply, at = parse(data, at)
                if not waiting:
                    raise ConnectionError("Redis sent a reply nobody asked for")
                future, count, replies, _ = waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    waiting.popleft()
                    if not future.done():
                        future.set_result(replies)
        except _Incomplete:
            pass
        except (ConnectionError, ValueError) as exc:
            self.fail(ConnectionError(f"Redis's reply could not be read: {exc}"))
            return
        self.buffer = data[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the connection"))

    def fail(self, exc: Exception) -> None:
        """The connection is done for: every call still waiting on it gets ``exc``."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(exc)


def _send(link: _Link, payload: bytes, count: int) -> asyncio.Future[list[Reply]]:
    future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
    link.waiting.append((future, count, [], future.get_loop().time()))
    assert link.transport is not None
    link.transport.write(payload)
    return future


class RespConnection:
    def __init__(self, url: str, timeout: float) -> None:
        params: dict[str, Any] = dict(parse_url(url))
        self.timeout = timeout
        self.path: str | None = None
        self.host: str = params.get("host", "localhost")
        self.port = int(params.get("port", 6379))
        self.ssl: ssl.SSLContext | None = None
        connection_class = params.get("connection_class")
        if connection_class is UnixDomainSocketConnection:
            self.path = params["path"]
        elif connection_class is SSLConnection:
            self.ssl = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
            if params.get("ssl_cert_reqs") in ("none", "optional"):
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        hello: list[bytes] = []
        if params.get("password") is not None:
            username = params.get("username")
            hello.append(encode(b"AUTH", *([username] if username else []), params["password"]))
        if int(params.get("db") or 0):
            hello.append(encode(b"SELECT", int(params["db"])))
        self.hello = hello
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.lost is None

    async def call(self, payload: bytes, count: int = 1) -> list[Reply]:
        """Write ``payload`` (``count`` commands, one after another) and return their replies;
        an error reply is returned as a ``ReplyError``, not raised."""
        if not self.connected:
            await self._connect()
        return await self.send(payload, count)

    def send(self, payload: bytes, count: int = 1) -> asyncio.Future[list[Reply]]:
        """``call`` on the open connection (``connected``), without waiting: the replies' future."""
        assert self._link is not None
        future = _send(self._link, payload, count)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout / 4, self._watch)
        return future

    def _watch(self) -> None:
        """Every quarter of the timeout while calls wait: fail the connection whose oldest call has
        waited longer than the timeout."""
        self._watchdog = None
        link = self._link
        if link is None or not link.waiting:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - link.waiting[0][3] >= self.timeout:
            link.fail(TimeoutError(f"Redis did not answer within {self.timeout:g} s"))
            return
        self._watchdog = loop.call_later(self.timeout / 4, self._watch)

    async def _connect(self) -> _Link:
        """The connection, opened once for every caller waiting on it."""
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.create_task(self._open())
        return await asyncio.shield(task)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if self.path is not None:
                    _, link = await loop.create_unix_connection(_Link, self.path)
                else:
                    _, link = await loop.create_connection(
                        _Link, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
                    )
                if self.hello:
                    for reply in await _send(link, b"".join(self.hello), len(self.hello)):
                        if isinstance(reply, ReplyError):
                            raise reply
        except BaseException:
            if link is not None:
                link.fail(ConnectionError("the connection's setup failed"))
            raise
        self._link = link
        return link

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._link is not None:
            self._link.fail(ConnectionError("closed"))
            self._link = None
