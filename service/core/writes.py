"""Socket writes held to the end of the event loop's turn, then made together.

The writes on a request's path (the request to the upstream, the response to the client) go through
their loop's ``TurnWrites``. While other requests run in the worker, each is held until the loop has
run everything that was ready in this turn, and then all of them are written one after another, by
one callback a turn. A request running alone writes at once: there is nothing to gather, and the
callback would cost the loop one more turn per write (~5k instructions). A peer on the same
machine (a local upstream or sidecar, a load generator) is woken once by a turn's writes instead of
once per write. Each such wake-up of an idle CPU is an inter-processor interrupt (on a virtual
machine, an exit to the hypervisor) paid in the writer's system time: on the bench machine, at 32
connections, 1.46 of them a request before and 0.13 after (bench/README, "Writes held to the turn's
end"). Writes to remote peers cost the same either way, but for the callback.

A connection's writes keep their order: whatever goes through ``TurnWrites`` for a transport leaves
before anything written to it later, and one of ``DIRECT_BYTES`` or more is made at once, after what
its transport holds, so large bodies meet the transport's flow control as they did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sized

DIRECT_BYTES = 16 * 1024
"""A write this large goes out at once: holding it saves nothing next to its own cost."""


class TurnWrites:
    """The held writes of one event loop, by transport."""

    __slots__ = ("held", "loop", "scheduled", "tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.held: dict[asyncio.WriteTransport, bytes | list[bytes]] = {}
        self.scheduled = False
        self.tasks: Sized = ()
        """The requests running in this worker (the server's set of request tasks, once it has one)."""

    def write(self, transport: asyncio.WriteTransport, data: bytes, hold: bool = False) -> None:
        """``transport.write(data)`` at the end of this turn while other requests run (or when
        ``hold``), else at once; at once too when ``data`` is large. What ``transport`` holds goes
        first, in the same write."""
        held = self.held.get(transport)
        if len(data) >= DIRECT_BYTES or not (hold or len(self.tasks) > 1):
            if held is None:
                transport.write(data)
            else:
                del self.held[transport]
                if held.__class__ is list:
                    transport.writelines([*held, data])
                elif len(data) < DIRECT_BYTES:  # a head and its body: joined, as small as they are
                    transport.write(held + data)  # type: ignore[operator]
                else:
                    transport.writelines([held, data])  # type: ignore[list-item]
            return
        if data.__class__ is not bytes:  # a bytearray or a view may change before the turn ends
            data = bytes(data)
        if held is None:
            self.held[transport] = data
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.flush)
        elif held.__class__ is list:
            held.append(data)
        else:
            self.held[transport] = [held, data]  # type: ignore[list-item]

    def flush(self) -> None:
        """Make every held write (the turn's end)."""
        self.scheduled = False
        held = self.held
        if held:
            self.held = {}
            for transport, data in held.items():
                if not transport.is_closing():  # a connection closed within the turn takes nothing more
                    transport.write(b"".join(data) if data.__class__ is list else data)  # type: ignore[arg-type]

    def flush_one(self, transport: asyncio.WriteTransport) -> None:
        """Make ``transport``'s held writes now (before it closes, or before a write of its own)."""
        data = self.held.pop(transport, None)
        if data is not None and not transport.is_closing():
            transport.write(b"".join(data) if data.__class__ is list else data)  # type: ignore[arg-type]


_last: TurnWrites | None = None


def turn_writes(loop: asyncio.AbstractEventLoop) -> TurnWrites:
    """``loop``'s ``TurnWrites`` (a worker runs one loop; a new loop, as in tests, gets its own)."""
    global _last
    if _last is None or _last.loop is not loop:
        _last = TurnWrites(loop)
    return _last
