"""One lean connection to Redis for the limits' request path: commands written as they come,
their replies matched in order (RESP pipelining), no pool and no per-command machinery.

Every request under limits makes one script call on the way in; through redis-py's asyncio client
that call cost some 140 µs of the gateway's own CPU on the bench machine (its pool, retry and
observability plumbing, a stream reader and a parser per line), against about 25 µs here, most of
it the two system calls. redis-py stays the client for the lease renewals and the probes while
Redis is away. The URL means the same to both: it is read by redis-py's ``parse_url``.

Concurrent callers share the connection: a call is written at once (or, while another is awaited,
with the rest of its loop turn's calls at the turn's end) and waits for its replies in turn. A call that
waits longer than ``timeout`` fails with ``TimeoutError``, and with it the connection (later replies
could no longer be matched): the next call connects anew.

A command nobody needs the answer of (``send`` with ``reply=False``: a limits release) goes out behind
``CLIENT REPLY SKIP``: Redis runs it and answers nothing, so no reply is read, parsed or woken up for.
Redis runs a connection's commands in order, so the next reply that arrives tells it has run; that
reply being an error of Redis's state (``LOADING``, ``OOM``, ``READONLY``, ``BUSY``…: anything but
``NOSCRIPT``, which is the command's own) or the connection failing first hands it back to its sender
as not taken (its ``Answer`` is called then, and only then). When nothing else follows it,
``check`` (a command of the caller's, with a reply) is sent ``CHECK_SECONDS`` later to have that
reply. A server that does not honour ``CLIENT REPLY SKIP`` (a proxy, an older server: found on
connecting, by a probe) gets such commands as ordinary calls.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import RedisError

Reply = Any
"""``int``, ``bytes``, ``None``, a ``ReplyError`` or a list of replies."""


class ReplyError(RedisError):
    """An error Redis answered a command with (``NOSCRIPT …``, ``ERR …``)."""


TICKS = 4
"""How often per timeout the calls waiting are looked at."""
MAX_PENDING_REPLY = 1024 * 1024
"""The most of an unfinished reply held (the limits' replies are a few hundred bytes): past it the
connection fails rather than grow without end."""


CHECK_SECONDS = 1.0
"""How long a command sent without a reply waits for a later one before ``check`` is sent."""
SKIP = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"
_PROBE_ECHO = b"replies-skipped"


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
    """A call waiting for its replies: a future some task awaits, or an ``Answer`` to call. A
    ``count`` of 0: a command Redis was told not to answer (``SKIP``), waiting for a later reply."""

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

    A call made while the last one written is awaited by its caller (requests running side by side)
    waits for the end of the loop turn and leaves in one write with the rest of that turn's: under
    load, the admissions of the requests a turn handles share a system call and a wake-up of Redis
    instead of taking one each. Otherwise (one request at a time, whose release, never awaited, may
    still wait for its reply) it is written at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiting: deque[_Call] = deque()
        self.lost: Exception | None = None
        self.queued: list[bytes] | None = None
        """What waits for the turn's end to be written."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def call(self, payload: bytes, call: _Call) -> None:
        assert self.transport is not None
        waiting = self.waiting
        if self.queued is not None:
            self.queued.append(payload)
        elif waiting and waiting[-1].future is not None:  # awaited by a request still running
            self.queued = [payload]
            asyncio.get_running_loop().call_soon(self.write_queued)
        else:
            self.transport.write(payload)
        waiting.append(call)

    def write_queued(self) -> None:
        queued = self.queued
        self.queued = None
        if queued and self.lost is None and self.transport is not None:
            self.transport.write(b"".join(queued))

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
                while not call.count:  # ran before this reply's command: taken, unless Redis is unwell
                    waiting.popleft()
                    if reply.__class__ is ReplyError and not _only_its_own(reply):
                        call.done(reply)
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

    @property
    def unchecked(self) -> bool:
        """Whether the last command written waits for a later reply to tell it has run."""
        return bool(self.waiting) and not self.waiting[-1].count

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


def _only_its_own(error: ReplyError) -> bool:
    """Whether an error reply is about its own command alone (``NOSCRIPT``: that script is not
    loaded), not about the state of Redis, which commands just before it would have met too."""
    return str(error).startswith("NOSCRIPT")


def _ignore(outcome: list[Reply] | Exception) -> None:
    pass


class RespConnection:
    def __init__(self, url: str, timeout: float, check: bytes = b"*1\r\n$4\r\nPING\r\n") -> None:
        """``check``: the command sent, with its reply, to learn whether commands sent without one
        have run; best one Redis would refuse in the same states as them (the limits send a release
        of nothing)."""
        params: dict[str, Any] = dict(parse_url(url))
        self.timeout = timeout
        self.check = check
        self.skips: bool | None = None
        """Whether Redis honours ``CLIENT REPLY SKIP`` (``None``: not connected yet). Asked again on
        every connection while it does: a reply the connection did not expect would be matched to
        the wrong call."""
        self._checking: asyncio.TimerHandle | None = None
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

    def send(self, payload: bytes, answer: Answer, count: int = 1, *, reply: bool = True) -> None:
        """``call`` on the open connection (``connected``) without waiting: ``answer`` is called
        with the replies, or with why there are none. With ``reply=False`` (``payload`` one command),
        Redis is told not to answer it (when it honours that): ``answer`` is called only if it may
        not have run, with the error reply that followed it or why the connection failed."""
        link = self._link
        assert link is not None
        if not reply and self.skips:
            link.call(SKIP + payload, _Call(0, None, answer))
            if self._checking is None:
                self._checking = asyncio.get_running_loop().call_later(CHECK_SECONDS, self._check)
            return
        link.call(payload, _Call(count, None, answer))
        if self._watchdog is None:
            self._watch_later()

    def _check(self) -> None:
        """``check`` sent, when the last command written still waits for a later reply."""
        self._checking = None
        link = self._link
        if link is not None and link.lost is None and link.unchecked:
            self.send(self.check, _ignore)

    def _watch_later(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout / TICKS, self._watch)

    def _watch(self) -> None:
        """Every ``timeout / TICKS`` while calls wait: the connection fails when the same call has
        been the oldest waiting at ``TICKS + 1`` ticks in a row (it waited at least ``timeout``)."""
        self._watchdog = None
        link = self._link
        oldest = next((call for call in link.waiting if call.count), None) if link is not None else None
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
                    for reply in await _ask(link, b"".join(self.hello), len(self.hello)):
                        if isinstance(reply, ReplyError):
                            raise reply
                if self.skips is not False:  # each connection's server asked (a new one may differ)
                    # honoured, the PING goes unanswered; else an error, then the PING's and the
                    # ECHO's replies, which nobody waits for: this connection fails, the next is made
                    # knowing
                    probe = SKIP + encode("PING") + encode("ECHO", _PROBE_ECHO)
                    self.skips = (await _ask(link, probe, 1)) == [_PROBE_ECHO]
                    if not self.skips:
                        link.fail(ConnectionError("Redis does not honour CLIENT REPLY SKIP"))
                        link = None
                        return await self._open()
        except BaseException:
            if link is not None:
                link.fail(ConnectionError("the connection's setup failed"))
            raise
        self._link = link
        return link

    def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._link is not None:
            self._link.fail(ConnectionError("closed"))
            self._link = None


async def _ask(link: _Link, payload: bytes, count: int) -> list[Reply]:
    """``count`` replies to ``payload``, on a connection being set up."""
    answered: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
    link.call(payload, _Call(count, answered, None))
    return await answered
