"""``TurnWrites`` and the connection's ``TurnWriter``: while other requests run, writes are held to the
end of the loop turn and made together; a request alone writes at once; a head and a body in hand leave
in one write either way; a connection's writes keep their order, large writes go at once, nothing is
written to a connection that closed. The transport is a recording stand-in for the event loop's socket
transport; the loop is a real one. The whole path over real sockets is in the server and relay tests."""

from __future__ import annotations

import asyncio

from service.core.writes import DIRECT_BYTES, TurnWrites, turn_writes
from service.protocol import TurnWriter


class Recorded:
    """What a socket transport was asked to do, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.calls = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.calls += 1
        self.writes.append(data)

    def writelines(self, data: list[bytes]) -> None:
        assert not self.closed
        self.calls += 1
        self.writes.append(b"".join(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def writes(running: int = 3) -> TurnWrites:
    """The loop's ``TurnWrites``, with ``running`` requests running in the worker."""
    batch = turn_writes(asyncio.get_running_loop())
    batch.tasks = range(running)
    return batch


def writer(running: int = 3) -> tuple[TurnWriter, Recorded]:
    """A connection's writer over a recording transport, with ``running`` requests running."""
    transport = Recorded()
    return TurnWriter(transport, writes(running)), transport  # type: ignore[arg-type]


async def test_a_request_alone_writes_at_once_but_for_its_head_which_waits_for_the_body() -> None:
    out, transport = writer(running=1)
    out.write(b"HEAD\r\n\r\n")
    assert transport.writes == []
    out.write(b"body")
    assert transport.writes == [b"HEAD\r\n\r\nbody"] and transport.calls == 1
    out.next_response()
    out.write(b"HEAD 2")  # a streamed head: out by the end of the turn, the events at once
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD\r\n\r\nbody", b"HEAD 2"]
    out.write(b"event")
    assert transport.writes == [b"HEAD\r\n\r\nbody", b"HEAD 2", b"event"]


async def test_while_others_run_a_head_and_a_body_leave_in_one_write_at_the_turns_end() -> None:
    out, transport = writer()
    out.write(b"HEAD\r\n\r\n")
    out.write(b"body")
    out.next_response()
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD\r\n\r\nbody"] and transport.calls == 1


async def test_while_others_run_the_writes_of_one_turn_leave_together_each_connections_in_order() -> None:
    batch = writes()
    first, second = Recorded(), Recorded()
    batch.write(first, b"1a")  # type: ignore[arg-type]
    batch.write(second, b"2a")  # type: ignore[arg-type]
    batch.write(first, b"1b")  # type: ignore[arg-type]
    batch.write(first, b"1c")  # type: ignore[arg-type]
    assert first.writes == second.writes == []
    await asyncio.sleep(0)
    assert first.writes == [b"1a1b1c"] and second.writes == [b"2a"]
    batch.write(second, b"2b")  # type: ignore[arg-type]  # the next turn: held again
    assert second.writes == [b"2a"]
    await asyncio.sleep(0)
    assert second.writes == [b"2a", b"2b"]


async def test_a_streamed_head_and_its_events_leave_turn_by_turn() -> None:
    out, transport = writer()
    out.write(b"HEAD")
    await asyncio.sleep(0)  # the turn ends: nothing came with the head
    assert transport.writes == [b"HEAD"]
    out.write(b"event 1")
    assert transport.writes == [b"HEAD"]  # held while others run
    await asyncio.sleep(0)
    out.write(b"event 2")
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD", b"event 1", b"event 2"]


async def test_a_large_write_goes_at_once_after_what_its_connection_holds() -> None:
    transport, other = Recorded(), Recorded()
    batch = writes()
    batch.write(other, b"other")  # type: ignore[arg-type]
    batch.write(transport, b"HEAD")  # type: ignore[arg-type]
    big = b"x" * DIRECT_BYTES
    batch.write(transport, big)  # type: ignore[arg-type]
    assert transport.writes == [b"HEAD" + big] and transport.calls == 1
    assert other.writes == []  # the other connection's write waits for the turn's end
    batch.write(transport, big)  # type: ignore[arg-type]  # nothing held: alone, at once
    assert transport.writes == [b"HEAD" + big, big]
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD" + big, big] and other.writes == [b"other"]


async def test_closing_makes_what_is_held_first() -> None:
    out, transport = writer()
    out.write(b"HEAD 1")
    out.write(b"body 1")
    out.close()
    assert transport.writes == [b"HEAD 1body 1"] and transport.closed
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD 1body 1"]


async def test_a_write_held_when_the_client_goes_is_dropped_quietly() -> None:
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


async def test_each_loop_has_its_own() -> None:
    here = turn_writes(asyncio.get_running_loop())
    assert turn_writes(asyncio.get_running_loop()) is here
    other = asyncio.new_event_loop()
    try:
        assert turn_writes(other) is not here and turn_writes(other).loop is other
    finally:
        other.close()


async def test_a_head_alone_then_the_next_responses_head_keep_their_order() -> None:
    out, transport = writer(running=1)
    out.write(b"HEAD 1")  # a response with no body (a HEAD request), complete in this turn
    out.next_response()
    out.write(b"HEAD 2")  # the next (pipelined) response's head, in the same turn
    out.write(b"body 2")
    assert transport.writes == [b"HEAD 1HEAD 2body 2"]
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD 1HEAD 2body 2"]


async def test_when_the_others_end_within_the_turn_what_is_held_leaves_first_with_the_next_write() -> None:
    batch = writes(running=3)
    one, many = Recorded(), Recorded()
    batch.write(one, b"a")  # type: ignore[arg-type]
    batch.write(many, b"1")  # type: ignore[arg-type]
    batch.write(many, b"2")  # type: ignore[arg-type]
    batch.tasks = range(1)  # the other requests ended: this one runs alone
    batch.write(one, b"b")  # type: ignore[arg-type]
    batch.write(many, b"3")  # type: ignore[arg-type]
    assert one.writes == [b"ab"] and many.writes == [b"123"]
    assert one.calls == many.calls == 1
    batch.write(one, b"c")  # type: ignore[arg-type]  # nothing held now: at once
    assert one.writes == [b"ab", b"c"]
    await asyncio.sleep(0)
    assert one.writes == [b"ab", b"c"] and many.writes == [b"123"]


async def test_what_is_held_is_a_copy_and_a_connection_closed_within_the_turn_gets_nothing() -> None:
    batch = writes(running=3)
    kept, closed = Recorded(), Recorded()
    body = bytearray(b"body")
    batch.write(kept, body)  # type: ignore[arg-type]
    batch.write(kept, memoryview(b" and more"))  # type: ignore[arg-type]
    body[:] = b"XXXX"  # the caller reuses its buffer before the turn ends
    batch.write(closed, b"lost")  # type: ignore[arg-type]
    closed.close()
    await asyncio.sleep(0)
    assert kept.writes == [b"body and more"] and closed.writes == []


async def test_a_100_continue_goes_at_once_and_the_head_after_it_still_waits_for_its_body() -> None:
    out, transport = writer(running=3)
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    out.write(b"HEAD ")
    out.write(b"body")
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HEAD body"]
