"""The relay's per-request timer (``providers.watch.Exchange``) in process: the header deadline, the
client leaving, the idle stream, and what a request that finishes first costs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from starlette.types import Message

from providers.watch import NOT_READING, WATCH_AFTER_SECONDS, Exchange, header_deadlines
from service.core.request import DISCONNECT_KEY


class Client:
    """The ASGI ``receive`` of a client whose body is sent: it waits until told it disconnected."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.calls = 0

    async def receive(self) -> Message:
        self.calls += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def relay(
    client: Client, work: Callable[[Exchange], Awaitable[None]], *, server_watches: bool = False
) -> tuple[Exchange, bool]:
    """Run ``work`` in a task of its own, as the relay runs: (the exchange, whether it was cancelled).
    With ``server_watches``, under a server that reports the client leaving (the gateway's own)."""
    made: list[Exchange] = []

    async def request() -> None:
        exchange = Exchange(client.receive, {DISCONNECT_KEY: None} if server_watches else None)
        made.append(exchange)
        try:
            await work(exchange)
        finally:
            exchange.stop()

    task = asyncio.create_task(request())
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.CancelledError:
        return made[0], True
    return made[0], False


async def test_the_header_deadline_cancels_the_request_as_timed_out() -> None:
    client = Client()

    async def waiting_for_headers(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.2)
        await asyncio.Event().wait()  # an upstream that never answers

    exchange, cancelled = await relay(client, waiting_for_headers)
    assert cancelled and exchange.timed_out and not exchange.client_gone
    assert exchange.watcher is not None
    await asyncio.gather(exchange.watcher, return_exceptions=True)
    assert exchange.watcher.cancelled()  # the watch ends with the request
    assert client.calls == 1


async def test_the_deadline_applies_while_the_body_is_still_being_sent_without_a_watcher() -> None:
    client = Client()

    async def uploading(exchange: Exchange) -> None:
        exchange.arm(0.1)  # body_done stays False: the relay itself is reading receive()
        await asyncio.Event().wait()

    exchange, cancelled = await relay(client, uploading)
    assert cancelled and exchange.timed_out
    assert exchange.watcher is None and client.calls == 0  # receive() is the relay's until the body is done


async def test_a_disconnect_cancels_the_request_as_client_gone() -> None:
    client = Client()

    async def waiting_for_headers(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(60)
        asyncio.get_running_loop().call_later(0.1, client.gone.set)  # the client hangs up
        await asyncio.Event().wait()

    exchange, cancelled = await relay(client, waiting_for_headers)
    assert cancelled and exchange.client_gone and not exchange.timed_out


async def test_a_disconnect_after_the_response_finished_changes_nothing() -> None:
    client = Client()

    async def answered(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(60)
        await asyncio.sleep(WATCH_AFTER_SECONDS * 3)  # long enough for the watcher to start: the behaviour here
        assert exchange.watcher is not None
        exchange.finished = True
        exchange.waiting_headers = False
        client.gone.set()  # the client closes once it has its answer
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    exchange, cancelled = await relay(client, answered)
    assert not cancelled and not exchange.client_gone and not exchange.timed_out


async def test_a_request_that_finishes_first_costs_no_watcher_task() -> None:
    client = Client()
    tasks_during: list[int] = []

    async def quick(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(60)
        tasks_during.append(len(asyncio.all_tasks()))
        exchange.waiting_headers = False

    before = len(asyncio.all_tasks())
    exchange, cancelled = await relay(client, quick)
    assert not cancelled and exchange.finished
    assert exchange.watcher is None and client.calls == 0
    assert tasks_during == [before + 1]  # the request's own task and nothing else
    assert exchange.timer is not None and exchange.timer.cancelled()  # no watcher can start later either


async def test_an_idle_stream_is_cut_only_while_waiting_for_the_upstream() -> None:
    client = Client()

    async def streaming(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.watch_idle(0.1)
        exchange.reading_since = NOT_READING  # sending to a slow client: never idle, however long
        await asyncio.sleep(0.3)  # three idle periods pass without a cut: the behaviour under test
        assert not exchange.idled
        exchange.reading_since = exchange.loop.time()  # now waiting for the upstream's next chunk
        await asyncio.Event().wait()

    exchange, cancelled = await relay(client, streaming)
    assert cancelled and exchange.idled and not exchange.timed_out and not exchange.client_gone


async def test_stop_ends_every_timer() -> None:
    client = Client()

    async def stopped_early(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.05)
        exchange.watch_idle(0.05)
        exchange.stop()
        await asyncio.sleep(0.2)  # past both deadlines: nothing may fire (the behaviour under test)

    exchange, cancelled = await relay(client, stopped_early)
    assert not cancelled and not exchange.timed_out and not exchange.idled
    assert exchange.idle_timer is not None and exchange.idle_timer.cancelled()


@pytest.mark.parametrize("gone_first", [True, False])
async def test_a_client_gone_before_the_deadline_is_not_also_a_timeout(gone_first: bool) -> None:
    client = Client()

    async def work(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.3)
        if gone_first:
            asyncio.get_running_loop().call_later(0.05, client.gone.set)
        await asyncio.Event().wait()

    exchange, cancelled = await relay(client, work)
    assert cancelled
    assert (exchange.client_gone, exchange.timed_out) == (gone_first, not gone_first)


async def test_under_the_gateways_server_the_header_deadline_is_swept_not_timed() -> None:
    client = Client()
    loop = asyncio.get_running_loop()

    async def waiting_for_headers(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.2)
        await asyncio.Event().wait()  # an upstream that never answers

    started = loop.time()
    exchange, cancelled = await relay(client, waiting_for_headers, server_watches=True)
    # cancelled as timed out, between the deadline and one sweep (a quarter of the timeout) after it
    assert cancelled and exchange.timed_out and not exchange.client_gone
    assert 0.2 <= loop.time() - started < 0.2 + 0.05 + 0.1
    assert exchange.timer is None and exchange.watcher is None and client.calls == 0
    assert not header_deadlines(loop).waiting


async def test_swept_requests_that_finish_leave_the_sweep_and_it_stops() -> None:
    client = Client()
    loop = asyncio.get_running_loop()
    sweep = header_deadlines(loop)

    async def quick(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.1)
        assert exchange in sweep.waiting
        exchange.waiting_headers = False

    for _ in range(3):
        exchange, cancelled = await relay(client, quick, server_watches=True)
        assert not cancelled and not exchange.timed_out
    assert not sweep.waiting
    await asyncio.sleep(0.1)  # past the deadlines: nothing fired, and the sweep found nothing to do
    assert sweep.handle is None


async def test_a_swept_request_the_client_left_is_not_also_a_timeout() -> None:
    client = Client()

    async def work(exchange: Exchange) -> None:
        exchange.body_done = True
        exchange.arm(0.2)
        asyncio.get_running_loop().call_later(0.05, exchange.client_left)  # the server saw the client go
        await asyncio.Event().wait()

    exchange, cancelled = await relay(client, work, server_watches=True)
    assert cancelled and exchange.client_gone and not exchange.timed_out
