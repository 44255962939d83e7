"""``TurnWrites`` and the connection's ``TurnWriter``: writes are held to the end of the loop turn and
made together, a head and a body in hand in one write, a connection's writes in order, large writes at
once, nothing written to a connection that closed. The transport is a recording stand-in for the event
loop's socket transport; the loop is a real one. The whole path over real sockets is in the server and
relay tests."""

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


def writes() -> TurnWrites:
    return turn_writes(asyncio.get_running_loop())


async def test_a_head_and_a_body_in_hand_leave_in_one_write_at_the_turns_end() -> None:
    transport = Recorded()
    out = TurnWriter(transport, writes())  # type: ignore[arg-type]
    out.write(b"HEAD\r\n\r\n")
    out.write(b"body")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD\r\n\r\nbody"] and transport.calls == 1


async def test_the_writes_of_one_turn_to_many_connections_leave_together_each_in_its_order() -> None:
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
    transport = Recorded()
    out = TurnWriter(transport, writes())  # type: ignore[arg-type]
    out.write(b"HEAD")
    await asyncio.sleep(0)  # the turn ends: nothing came with the head
    assert transport.writes == [b"HEAD"]
    out.write(b"event 1")
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
    transport = Recorded()
    out = TurnWriter(transport, writes())  # type: ignore[arg-type]
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
        transport = Recorded()
        out = TurnWriter(transport, writes())  # type: ignore[arg-type]
        out.write(b"HEAD")
        transport.close()  # the connection is lost within the turn
        await asyncio.sleep(0)  # the end-of-turn flush: nothing written to a closed transport, no error
    finally:
        loop.set_exception_handler(None)
    assert transport.writes == [] and errors == []


async def test_each_loop_has_its_own() -> None:
    here = writes()
    assert writes() is here
    other = asyncio.new_event_loop()
    try:
        assert turn_writes(other) is not here and turn_writes(other).loop is other
    finally:
        other.close()
