"""One lean connection to Redis for the limits' request path: commands written as they come,
their replies matched in order (RESP pipelining), no pool and no per-command machinery.

Every request under limits makes one script call on the way in; through redis-py's asyncio client
that call cost some 140 µs of the gateway's own CPU on the bench machine (its pool, retry and
observability plumbing, a stream reader and a parser per line), against about 25 µs here, most of
it the two system calls. redis-py stays the client for the lease renewals and the probes while
Redis is away. The URL means the same to both: it is read by redis-py's ``parse_url``.

Concurrent callers share the connection: a call is written at once (or, while other requests run or
another call is awaited, with the rest of its loop turn's writes at the turn's end) and waits for its
replies in turn. A call that
waits longer than ``timeout`` fails with ``TimeoutError``, and with it the connection (later replies
could no longer be matched): the next call connects anew.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import RedisError

from service.core.writes import TurnWrites, turn_writes

Reply = Any
"""``int``, ``bytes``, ``None``, a ``ReplyError`` or a list of replies."""


class ReplyError(RedisError):
    """An error Redis answered a command with (``NOSCRIPT …``, ``ERR …``)."""


TICKS = 4
"""How often per timeout the calls waiting are looked at."""
MAX_PENDING_REPLY = 1024 * 1024
"""The most of an unfinished reply held (the limits' replies are a few hundred bytes): past it the
connection fails rather than grow without end."""


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


Answer = Callable[[list[Reply] | Exception], None]
"""Called with a call's replies, or with why it failed."""


class _Call:
    """A call waiting for its replies: a future some task awaits, or an ``Answer`` to call."""

    __slots__ = ("answer", "count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Reply]] | None, answer: Answer | None) -> None:
        self.count = count
        self.future = future
        self.answer = answer
        self.replies: list[Reply] = []

    def done(self, outcome: list[Reply] | Exception) -> None:
        future = self.future
        if future is None:
            assert self.answer is not None
            self.answer(outcome)
        elif not future.done():
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


class _Link(asyncio.Protocol):
    """One physical connection; the calls waiting on it, oldest first.

    A call made while other requests run, or while the last one written is awaited by its caller,
    waits for the end of the loop turn and leaves in one write with the rest of that turn's, at the
    moment the turn's responses and upstream requests leave (``service.core.writes``): under load, the
    admissions and releases of the requests a turn handles share a system call and a wake-up of Redis
    instead of taking one each. Otherwise (one request at a time, whose release, never awaited, may
    still wait for its reply) it is written at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiting: deque[_Call] = deque()
        self.lost: Exception | None = None
        self.writes: TurnWrites | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.writes = turn_writes(asyncio.get_running_loop())

    def call(self, payload: bytes, call: _Call) -> None:
        assert self.transport is not None and self.writes is not None
        waiting = self.waiting
        # held to the turn's end as well while the last call written is awaited by a request still running
        self.writes.write(self.transport, payload, bool(waiting) and waiting[-1].future is not None)
        waiting.append(call)

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
                call = waiting[0]
                replies = call.replies
                replies.append(reply)
                if len(replies) == call.count:
                    waiting.popleft()
                    call.done(replies)
        except _Incomplete:
            pass
        except (ConnectionError, ValueError, RecursionError) as exc:
            self.fail(ConnectionError(f"Redis's reply could not be read: {type(exc).__name__}"))
            return
        self.buffer = data[at:]
        if len(self.buffer) > MAX_PENDING_REPLY:
            self.fail(ConnectionError(f"Redis's reply is over {MAX_PENDING_REPLY} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the connection"))

    def fail(self, exc: Exception) -> None:
        """The connection is done for: every call still waiting on it gets ``exc``."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            self.waiting.popleft().done(exc)


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
        self._closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._oldest: _Call | None = None
        self._ticks = 0

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.lost is None

    def call(self, payload: bytes, count: int = 1) -> Awaitable[list[Reply]]:
        """Write ``payload`` (``count`` commands, one after another); awaited, their replies (an
        error reply is returned as a ``ReplyError``, not raised). Written at once when the
        connection is open (a future to await, no coroutine in between), else once it is."""
        link = self._link
        if link is None or link.lost is not None:
            return self._call_connecting(payload, count)
        future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        link.call(payload, _Call(count, future, None))
        if self._watchdog is None:
            self._watch_later()
        return future

    async def _call_connecting(self, payload: bytes, count: int) -> list[Reply]:
        link = await self._connect()
        future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        link.call(payload, _Call(count, future, None))
        if self._watchdog is None:
            self._watch_later()
        return await future

    def send(self, payload: bytes, answer: Answer, count: int = 1) -> None:
        """``call`` on the open connection (``connected``) without waiting: ``answer`` is called
        with the replies, or with why there are none."""
        assert self._link is not None
        self._link.call(payload, _Call(count, None, answer))
        if self._watchdog is None:
            self._watch_later()

    def _watch_later(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout / TICKS, self._watch)

    def _watch(self) -> None:
        """Every ``timeout / TICKS`` while calls wait: the connection fails when the same call has
        been the oldest waiting at ``TICKS + 1`` ticks in a row (it waited at least ``timeout``)."""
        self._watchdog = None
        link = self._link
        oldest = link.waiting[0] if link is not None and link.waiting else None
        if oldest is None:
            self._oldest = None
            return
        if oldest is not self._oldest:
            self._oldest, self._ticks = oldest, 0
        self._ticks += 1
        if self._ticks > TICKS:
            assert link is not None
            link.fail(TimeoutError(f"Redis did not answer within {self.timeout:g} s"))
            self._oldest = None
            return
        self._watch_later()

    async def _connect(self) -> _Link:
        """The connection, opened once for every caller waiting on it."""
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.create_task(self._open())
        return await asyncio.shield(task)

    async def _open(self) -> _Link:
        if self._closed:
            raise ConnectionError("the connection to Redis is closed")
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
                    answered: asyncio.Future[list[Reply]] = loop.create_future()
                    link.call(b"".join(self.hello), _Call(len(self.hello), answered, None))
                    for reply in await answered:
                        if isinstance(reply, ReplyError):
                            raise reply
        except BaseException:
            if link is not None:
                link.fail(ConnectionError("the connection's setup failed"))
            raise
        if self._closed:  # closed while this was opening: nobody would close it
            link.fail(ConnectionError("closed"))
            raise ConnectionError("the connection to Redis was closed while it opened")
        self._link = link
        return link

    def close(self) -> None:
        """Close the connection, and any being opened; calls from now on fail with ``ConnectionError``."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._link is not None:
            self._link.fail(ConnectionError("closed"))
            self._link = None
