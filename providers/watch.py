"""The relay's timers: the header deadline, the disconnect watch, the idle stream.

Under the gateway's own server, which reports a client leaving itself, the header deadline is the
only timer a request needs, and it is not a timer of its own: the exchanges waiting for their
upstream's headers are looked at by one sweep per event loop (``HeaderDeadlines``), running while
there are some. A uvloop timer costs ~8k instructions to make and cancel, more than anything else
the relay does per request; a sweep costs a set insertion and removal per request."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope

from service.core.request import DISCONNECT_KEY

# A request still running after this long gets a task that watches for the client leaving; a
# short one never pays for it. Either way a disconnect cancels the upstream call within this bound.
WATCH_AFTER_SECONDS = 0.02
NOT_READING = float("inf")
SWEEP_SECONDS = 0.25
"""How often the header deadlines are looked at, at most (a quarter of the shortest timeout when
that is shorter): a request times out between its deadline and one sweep after it."""


class HeaderDeadlines:
    """One event loop's exchanges waiting for their upstream's headers, swept every ``interval``
    seconds by one timer that runs while there are some."""

    __slots__ = ("handle", "interval", "loop", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: set[Exchange] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.interval = SWEEP_SECONDS

    def add(self, exchange: Exchange, timeout: float) -> None:
        self.waiting.add(exchange)
        if timeout < 4 * self.interval:
            self.interval = max(0.01, timeout / 4)
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        waiting = self.waiting
        for exchange in list(waiting):
            if exchange.finished or not exchange.waiting_headers:
                waiting.discard(exchange)
            elif now >= exchange.deadline:
                waiting.discard(exchange)
                exchange.time_out()
        self.handle = self.loop.call_later(self.interval, self.sweep) if waiting else None


_sweeps: list[HeaderDeadlines] = []
"""The sweep of the event loop last seen (a process runs one loop; tests run one after another)."""


def header_deadlines(loop: asyncio.AbstractEventLoop) -> HeaderDeadlines:
    if not _sweeps or _sweeps[0].loop is not loop:
        _sweeps[:] = [HeaderDeadlines(loop)]
    return _sweeps[0]


class Exchange:
    """Per-request state shared by the relay and what watches it (a sweep, or a timer of its own).

    Under the gateway's own server (``DISCONNECT_KEY`` in the scope) the server calls
    ``client_left`` the moment the connection is lost, and the header deadline is swept
    (``HeaderDeadlines``). Under another server the timer first fires ``WATCH_AFTER_SECONDS`` after
    the request went upstream: a request that is done by then costs one timer handle and nothing
    else. Otherwise it starts a task that watches for the client leaving, then fires again at the
    header deadline. Both the deadline and the watcher cancel the relay's task with a flag set,
    which the relay turns into a 504 or a quiet end.
    """

    __slots__ = (
        "body_done",
        "client_gone",
        "deadline",
        "finished",
        "idle",
        "idle_timer",
        "idled",
        "loop",
        "reading_since",
        "receive",
        "server_watches",
        "swept",
        "task",
        "timed_out",
        "timer",
        "too_large",
        "waiting_headers",
        "watcher",
    )

    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.loop = task.get_loop()
        self.receive = receive
        self.body_done = False
        self.client_gone = False
        self.too_large = False
        self.timed_out = False
        self.finished = False
        self.waiting_headers = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.idle = 0.0
        self.idled = False
        self.reading_since = NOT_READING
        self.idle_timer: asyncio.TimerHandle | None = None
        self.swept: HeaderDeadlines | None = None
        self.server_watches = scope is not None and DISCONNECT_KEY in scope
        if self.server_watches:
            assert scope is not None
            scope[DISCONNECT_KEY] = self.client_left

    def client_left(self) -> None:
        """The server saw the connection go before the response was complete."""
        if not self.finished and not self.timed_out and not self.client_gone:
            self.client_gone = True
            self.task.cancel()

    def arm(self, timeout: float) -> None:
        self.waiting_headers = True
        now = self.loop.time()
        self.deadline = now + timeout
        if self.server_watches:
            self.swept = header_deadlines(self.loop)
            self.swept.add(self, timeout)
        else:
            self.timer = self.loop.call_at(min(self.deadline, now + WATCH_AFTER_SECONDS), self._tick)

    def time_out(self) -> None:
        """The upstream's headers did not come by the deadline: the relay's task is cancelled (a 504)."""
        if self.waiting_headers and not self.client_gone and not self.finished:
            self.timed_out = True
            self.task.cancel()

    def _tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        if self.waiting_headers and now >= self.deadline and not self.client_gone:
            self.time_out()
            return
        if self.body_done and self.watcher is None and not self.server_watches:
            self.watcher = self.loop.create_task(self._watch())
        if not self.body_done:
            self.timer = self.loop.call_at(min(self.deadline, now + WATCH_AFTER_SECONDS), self._tick)
        elif self.waiting_headers:
            self.timer = self.loop.call_at(self.deadline, self._tick)

    def watch_idle(self, idle: float) -> None:
        """Cancel the relay (with ``idled`` set) once it has waited ``idle`` seconds for one chunk.

        The relay only stamps ``reading_since`` around each read (``NOT_READING`` while it sends to
        a slow client): the timer checks the stamp when it fires and re-arms itself, so a chunk
        costs no timer work."""
        self.idle = idle
        self.idle_timer = self.loop.call_at(self.loop.time() + idle, self._idle_tick)

    def _idle_tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        since = self.reading_since
        if now - since >= self.idle:
            self.idled = True
            self.task.cancel()
            return
        self.idle_timer = self.loop.call_at(min(since, now) + self.idle, self._idle_tick)

    async def _watch(self) -> None:
        message: Message = await self.receive()
        if message["type"] == "http.disconnect" and not self.finished and not self.timed_out:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.swept is not None:
            self.swept.waiting.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
