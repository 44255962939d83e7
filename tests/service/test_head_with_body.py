"""``HeadWithBody``: a response's head leaves with the body in hand in one write, a streamed head by
the end of its loop turn, and writes keep their order. The transport is a recording stand-in for the
event loop's socket transport; the loop is a real one."""

from __future__ import annotations

import asyncio

from service.protocol import HeadWithBody


class Recorded:
    """What a socket transport was asked to do, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def writer() -> tuple[HeadWithBody, Recorded]:
    transport = Recorded()
    return HeadWithBody(transport, asyncio.get_running_loop()), transport  # type: ignore[arg-type]


async def test_a_head_and_a_body_in_hand_leave_in_one_write() -> None:
    out, transport = writer()
    out.write(b"HEAD\r\n\r\n")
    out.write(b"body")
    out.next_response()
    assert transport.writes == [b"HEAD\r\n\r\nbody"]
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD\r\n\r\nbody"]


async def test_a_streamed_head_leaves_by_the_end_of_its_turn_and_its_events_at_once() -> None:
    out, transport = writer()
    out.write(b"HEAD")
    assert transport.writes == []
    await asyncio.sleep(0)  # the turn ends: nothing came with the head
    assert transport.writes == [b"HEAD"]
    out.write(b"event 1")
    assert transport.writes == [b"HEAD", b"event 1"]
    out.write(b"event 2")
    out.next_response()
    assert transport.writes == [b"HEAD", b"event 1", b"event 2"]


async def test_every_response_on_a_connection_gets_its_head_held_and_order_is_kept() -> None:
    out, transport = writer()
    out.write(b"HEAD 1")  # a head alone (a HEAD request): out when its response ends
    out.next_response()
    assert transport.writes == [b"HEAD 1"]
    out.write(b"HEAD 2")
    out.write(b"body 2")
    out.next_response()
    out.write(b"HEAD 3")
    out.close()  # closing sends what is held first
    assert transport.writes == [b"HEAD 1", b"HEAD 2body 2", b"HEAD 3"]
    assert transport.closed
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD 1", b"HEAD 2body 2", b"HEAD 3"]


async def test_a_head_held_when_the_client_goes_is_dropped_quietly() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        out, transport = writer()
        out.write(b"HEAD")
        transport.close()  # the connection is lost within the turn
        await asyncio.sleep(0)  # the end-of-turn flush: nothing written to a closed transport, no error
    finally:
        loop.set_exception_handler(None)
    assert transport.writes == [] and errors == []
