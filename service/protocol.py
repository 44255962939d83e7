"""``GatewayHttpProtocol`` is uvicorn's httptools protocol with the limits it lacks, enforced before the
app sees anything:

- the request head (request line and headers) is capped at ``MAX_HEADER_BYTES`` in all and
  ``MAX_HEADER_LINE_BYTES`` per line (the URL counts as a line): over either → 431, then close.
  httptools concatenates a header's pieces as they arrive, so the bytes are counted in
  ``data_received`` before they reach the parser, not after;
- the whole head must arrive within ``HEADER_READ_TIMEOUT_SECONDS`` of the connection opening or,
  on a kept-alive connection, of the next request's first byte (idle keep-alive connections keep
  uvicorn's keep-alive timeout); late → 408 if some of it came, a plain close if none did;
- both are deadlines looked at by one sweep per worker (at most every second), not a timer per
  connection and request: a uvloop timer costs ~8k instructions to make and cancel, uvicorn's
  keep-alive timer was made after every response and cancelled by the next request's first bytes,
  and an idle connection now closes up to a second after its keep-alive timeout;
- at most ``MAX_CONNECTIONS`` open connections per worker: past that a new connection is answered
  503 and closed at once, with one warning when the cap starts biting and one line when it stops;
- requests the parser rejects get a JSON 400 instead of uvicorn's plain-text one, and a request whose
  ``Transfer-Encoding`` is anything but ``chunked`` (``gzip, chunked``, say: the parser would undo the
  chunks and hand on gzip bytes nobody declared) a JSON 501, as RFC 9112 asks;
- a connection lost before its response is complete calls the request's ``DISCONNECT_KEY`` callback
  (the relay's), which stops the upstream call at once.

It also writes through ``TurnWriter``: a head and a body in hand leave in one write, and while other
requests run the responses of one loop turn leave together at its end; and it makes the head with
uvicorn's checks for a fraction of their cost (``GatewayCycle``).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import httptools
import orjson
import structlog
from uvicorn._types import ASGISendEvent, HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl, service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from config import Settings
from service.core.request import DISCONNECT_KEY
from service.core.writes import TurnWrites, turn_writes

log = structlog.get_logger("gateway.server")

INVALID_REQUEST = "Invalid HTTP request."


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int
    max_header_line_bytes: int
    header_read_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_header_bytes,
            settings.max_header_line_bytes,
            settings.header_read_timeout_seconds,
            settings.max_connections,
        )


class _State:
    """Per worker process: the limits (read once from the settings), whether the cap is biting, and
    the loop whose sweep closes connections past their head deadline."""

    limits: Limits | None = None
    refusing = False
    refused = 0
    swept_loop: asyncio.AbstractEventLoop | None = None


def limits() -> Limits:
    if _State.limits is None:
        # a worker process: the settings were validated by the runner before it started
        _State.limits = Limits.from_settings(Settings.from_env())
    return _State.limits


class HeadTooLarge(Exception):
    """The request head is over a limit; the message says which (never the header's content)."""


class UnsupportedCoding(Exception):
    """The request's ``Transfer-Encoding`` is not ``chunked`` alone."""


def _response(status: int, message: str, default_headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    body = orjson.dumps({"error": message})
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


class TurnWriter:
    """What a connection's response cycles write through: its transport, and the loop's
    ``TurnWrites`` (``service.core.writes``). A response's first write (its head) is held until the
    next write or the end of the loop turn, so a head and a body in hand leave in one ``write`` (one
    packet) and a streamed head before the first event. Other writes are made at once while this
    request runs alone, and held to the turn's end with the turn's other writes while others run, so
    the responses that end in one turn wake their clients together. Writes keep their order; closing
    makes what is held first."""

    __slots__ = ("head", "hold_next", "loop", "transport", "writes")

    def __init__(self, transport: asyncio.Transport, writes: TurnWrites) -> None:
        self.transport = transport
        self.writes = writes
        self.loop = writes.loop
        self.head: bytes | None = None
        self.hold_next = True

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            data = head + data
        if self.hold_next:  # a response's head (after the last one's, should that still be held)
            if data.startswith(b"HTTP/1.1 100 "):  # "100 Continue": the client waits for it to send its body
                self.writes.flush_one(self.transport)
                self.transport.write(data)
                return
            self.hold_next = False
            self.head = data
            if head is None:  # else its flush is on its way
                self.loop.call_soon(self.flush_head)
            return
        writes = self.writes
        if writes.held or len(writes.tasks) > 1:
            writes.write(self.transport, data)
        else:  # alone, nothing held: at once
            self.transport.write(data)

    def flush_head(self) -> None:
        """The end of the turn the head was written in: out with it, if nothing came to join it."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.transport.is_closing():  # the client may have gone within the turn
                self.writes.flush_one(self.transport)
                self.transport.write(head)

    def flush(self) -> None:
        """Out with everything held, now."""
        self.writes.flush_one(self.transport)
        self.flush_head()

    def next_response(self) -> None:
        """The response is complete: the next one's head is held."""
        self.hold_next = True

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()


_VALUE_BREAKS = bytes(0 if HEADER_VALUE_RE.match(bytes((byte,))) else 1 for byte in range(256))
"""uvicorn's rule for header values (``HEADER_VALUE_RE``: no control character but tab) as a
``bytes.translate`` table marking (0) the bytes a value may not hold. Names are checked with uvicorn's
``HEADER_RE`` itself (a name is a token)."""
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
MAX_NAMES_SEEN = 1024
_names_seen: set[bytes] = set()
"""Header names already found valid in this worker (names repeat from response to response)."""


class GatewayCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, sending what uvicorn's sends, checked as uvicorn checks it,
    for less: uvicorn runs two regular expressions over every header of every response (~3.5k
    instructions a header, some 20k a proxied response). Here a name is checked once per worker
    (names repeat; the valid ones seen are kept, lowercased, at most ``MAX_NAMES_SEEN``), and every
    value at once: in the whole head, the bytes no value may hold (control characters but tab) must be
    exactly its line ends. A name or value that fails is the same ``RuntimeError`` as uvicorn's, before anything is
    written. Made by ``GatewayHttpProtocol.on_headers_complete``, with uvicorn's arguments in uvicorn's
    order but given by position, and the state every cycle starts in as class attributes (an instance
    gets its own as it changes): ~4k instructions instead of ~9.5k a request."""

    disconnected = False
    more_body = True
    response_started = False
    response_complete = False
    chunked_encoding: bool | None = None
    expected_content_length = 0

    def __init__(
        self,
        scope: HTTPScope,
        transport: asyncio.Transport,
        flow: FlowControl,
        logger: logging.Logger,
        access_logger: logging.Logger,
        access_log: bool,
        default_headers: list[tuple[bytes, bytes]],
        message_event: asyncio.Event,
        expect_100_continue: bool,
        keep_alive: bool,
        on_response: Callable[..., None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.logger = logger
        self.access_logger = access_logger
        self.access_log = access_log
        self.default_headers = default_headers
        self.message_event = message_event
        self.on_response = on_response
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.body = bytearray()

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
            self.transport.write(self.head(message["status"], message.get("headers", ())))
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
            body: bytes = message.get("body", b"")
            more_body = message.get("more_body", False)
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                if more_body:
                    if body:
                        self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
                else:
                    self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
            else:
                if len(body) > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= len(body)
                self.transport.write(body)
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
        else:
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after response already completed.")

    def head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The response's status line and headers (the server's first, as uvicorn writes them)."""
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        content = [STATUS_LINE[status]]
        seen = _names_seen
        lines = 0
        closing = False
        for headers_of in (self.default_headers, headers):
            for name, value in headers_of:
                # a name seen before is lowercase and valid as it is: no new lowercased copy (the
                # lookup costs half of one)
                if name not in seen:
                    name = name.lower()
                if name not in seen:
                    if HEADER_RE.search(name):
                        raise RuntimeError("Invalid HTTP header name.")
                    if len(seen) >= MAX_NAMES_SEEN:
                        seen.clear()
                    seen.add(name)
                if name in _FRAMING:
                    if name == b"content-length":
                        if self.chunked_encoding is None:
                            self.expected_content_length = int(value.decode())
                            self.chunked_encoding = False
                    elif name == b"transfer-encoding":
                        if value.lower() == b"chunked":
                            self.expected_content_length = 0
                            self.chunked_encoding = True
                    elif b"close" in [token.lower().strip() for token in value.split(b",")]:
                        self.keep_alive = False
                        closing = True
                content += (name, b": ", value, b"\r\n")
                lines += 1
        if not self.keep_alive and not closing:
            content.append(b"connection: close\r\n")
            lines += 1
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        content.append(b"\r\n")
        head = b"".join(content)
        # the status line's end, each header line's and the head's: nothing else may break a value
        if head.translate(_VALUE_BREAKS).count(0) != 2 * (lines + 2):
            raise RuntimeError("Invalid HTTP header value.")
        return head


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head and on connections (module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits()
        self.refused_connection = False
        # the head being read: bytes so far, bytes of its current (unfinished) line, its deadline
        self.awaiting_head = True
        self.head_bytes = 0
        self.line_bytes = 0
        self.head_begun = False
        self.requests_read = 0  # to tell when one chunk ended a request and began the next
        self.head_deadline = 0.0  # loop time by which the head must be complete; 0: none running
        self.idle_deadline = 0.0  # loop time by which an idle kept-alive connection closes; 0: not idle

    # -- connections ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.refuse(transport)
            return
        super().connection_made(transport)
        writes = turn_writes(self.loop)
        writes.tasks = self.server_state.tasks
        self.writer = TurnWriter(transport, writes)
        if _State.swept_loop is not self.loop:
            _State.swept_loop = self.loop
            sweep_deadlines(self.loop, self.connections, min(1.0, self.limits.header_read_timeout / 4))
        self.arm_head_deadline()

    def refuse(self, transport: asyncio.Transport) -> None:
        self.refused_connection = True
        self.transport = transport
        _State.refused += 1
        if not _State.refusing:
            _State.refusing = True
            log.warning(
                "connection_limit_reached",
                max_connections=self.limits.max_connections,
                message="new connections are refused with 503 until some close (MAX_CONNECTIONS, per worker)",
            )
        transport.write(_response(503, "Too many connections; try again shortly.", self.server_state.default_headers))
        transport.close()

    def eof_received(self) -> None:
        """The client closed its side: the transport closes after this, so what is held goes first (a
        response completed in this loop turn)."""
        if not self.refused_connection:
            self.writer.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused_connection:
            return
        self.clear_head_deadline()
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            client_left: Callable[[], None] | None = cycle.scope.get(DISCONNECT_KEY)  # type: ignore[assignment]
            if client_left is not None:
                client_left()
        # a little below the cap before saying so, so that a load hovering at it logs a pair of lines
        # now and then rather than one per connection
        if _State.refusing and len(self.connections) < self.limits.max_connections * 9 // 10:
            log.info("connection_limit_cleared", refused=_State.refused, open=len(self.connections))
            _State.refusing = False
            _State.refused = 0

    # -- the request head: size ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # (a refused connection is closed at once: it receives nothing)
        self._unset_keepalive_if_required()
        if self.awaiting_head:
            if not self.head_begun:
                self.head_begun = True
                self.arm_head_deadline()
            limits = self.limits
            newline = data.rfind(b"\n")
            # the CR ending a line is not part of its content
            run = self.line_bytes + len(data) if newline < 0 else len(data) - newline - 1
            if newline < 0 and run > limits.max_header_line_bytes + 1:
                # no line ended in this chunk, so all of it belongs to the head's current line
                self.reject_head(f"a header line is over {limits.max_header_line_bytes} bytes")
                return
            room = limits.max_header_bytes - self.head_bytes
            if len(data) > room:
                # feed what fits: if the head ends within it the rest is body (or the next request)
                head, rest = data[:room], data[room:]
                self.head_bytes += len(head)
                if not self.feed(head):
                    return
                if self.awaiting_head:
                    self.reject_head(f"the request head is over {limits.max_header_bytes} bytes")
                    return
                self.data_received(rest)
                return
            self.head_bytes += len(data)
            requests_read = self.requests_read
            if not self.feed(data):
                return
            if self.awaiting_head:
                # the unfinished line is the chunk's tail, unless the chunk also ended a request
                self.line_bytes = run if requests_read == self.requests_read else 0
            return
        self.feed(data)

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; ``False`` when the connection was answered and closed."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self.reject_head(str(exc.__context__))
            elif isinstance(exc.__context__, UnsupportedCoding):
                log.info("request_coding_unsupported", client=self.client_host())
                self.answer_and_close(501, "Only the chunked transfer coding is supported.")
            else:
                self.send_400_response(INVALID_REQUEST)
            return False
        return True

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_header_line_bytes:
            raise HeadTooLarge(f"the URL is over {self.limits.max_header_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header, inlined (it runs for every header of every request), after the check
        if len(name) + 2 + len(value) > self.limits.max_header_line_bytes:
            raise HeadTooLarge(f"a header line is over {self.limits.max_header_line_bytes} bytes")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise UnsupportedCoding
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """uvicorn's, with the gateway's cycle writing through ``TurnWriter``: the request's scope
        completed from the parser, its cycle made, its task started (or queued behind a pipelined
        response still being sent)."""
        self.awaiting_head = False
        self.clear_head_deadline()
        scope = self.scope
        scope[DISCONNECT_KEY] = None  # type: ignore[literal-required]  # this server reports a client leaving
        parser = self.parser
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        target = self.url
        if target[:1] == b"/" and 35 not in target:  # origin form without a fragment ("#"), as requests come:
            raw_path, _, query = target.partition(b"?")  # the parser has checked its characters already
        else:  # absolute form, "*", a fragment: uvicorn's way
            url = httptools.parse_url(target)
            raw_path, query = url.path, url.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = query
        app = self.app
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        previous = self.cycle
        self.cycle = GatewayCycle(
            scope,
            self.writer,  # type: ignore[arg-type]
            self.flow,
            self.logger,
            self.access_logger,
            self.access_log,
            self.server_state.default_headers,
            asyncio.Event(),
            self.expect_100_continue,
            http_version != "1.0" and parser.should_keep_alive(),
            self.on_response_complete,
        )
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: it starts when the response before it is complete
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.head_begun:  # a request pipelined behind the previous one's body
            self.head_begun = True
            self.arm_head_deadline()

    def on_message_complete(self) -> None:
        self.awaiting_head = True
        self.head_bytes = self.line_bytes = 0
        self.head_begun = False
        self.requests_read += 1
        super().on_message_complete()

    # -- the request head: time ---------------------------------------------------------------

    def response_in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def arm_head_deadline(self) -> None:
        """Start the head's deadline, unless it runs already or a response is being sent (then it
        starts when that response is complete, should part of a next head have come meanwhile).
        A deadline, not a timer per request: one sweep per worker closes the late (``sweep_deadlines``)."""
        if not self.head_deadline and not (self.cycle is not None and not self.cycle.response_complete):
            self.head_deadline = self.loop.time() + self.limits.header_read_timeout

    def clear_head_deadline(self) -> None:
        self.head_deadline = 0.0

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timeout a deadline (``sweep_deadlines``) instead of a timer."""
        self.writer.next_response()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self.idle_deadline = 0.0
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.idle_deadline = self.loop.time() + self.timeout_keep_alive
        if self.awaiting_head and self.head_begun:
            self.arm_head_deadline()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn's cancels its keep-alive timer (on every chunk received, and when a connection
        # closes): here there is only the deadline to drop
        self.idle_deadline = 0.0

    def idle_timed_out(self) -> None:
        self.idle_deadline = 0.0
        self.writer.flush()
        self.timeout_keep_alive_handler()

    def shutdown(self) -> None:
        """uvicorn's: a connection between responses closes at once, after what its writer holds."""
        if self.cycle is None or self.cycle.response_complete:
            self.writer.flush()
        super().shutdown()

    def head_timed_out(self) -> None:
        self.head_deadline = 0.0
        if self.transport.is_closing():
            return
        if self.head_begun and not self.response_in_flight():
            log.info("request_head_timeout", client=self.client_host(), timeout=self.limits.header_read_timeout)
            self.answer_and_close(408, "The request head did not arrive in time.")
        else:
            self.writer.flush()
            self.transport.close()

    # -- answers ------------------------------------------------------------------------------

    def client_host(self) -> str | None:
        return self.client[0] if self.client else None

    def reject_head(self, reason: str) -> None:
        log.info("request_head_too_large", client=self.client_host(), reason=reason)
        self.answer_and_close(431, "Request header fields too large: " + reason + ".")

    def send_400_response(self, msg: str) -> None:
        # uvicorn logs each of these as a warning with no detail; one info line, like an access line
        log.info("request_invalid", client=self.client_host())
        self.answer_and_close(400, INVALID_REQUEST)

    def answer_and_close(self, status: int, message: str) -> None:
        self.clear_head_deadline()
        self.writer.flush()
        if not self.response_in_flight():  # never write into the middle of another response
            self.transport.write(_response(status, message, self.server_state.default_headers))
        self.transport.close()


def sweep_deadlines(loop: asyncio.AbstractEventLoop, connections: Collection[object], interval: float) -> None:
    """Close the connections past their head deadline or their keep-alive timeout, now and every
    ``interval`` seconds: each is closed between its deadline and ``interval`` after it."""
    now = loop.time()
    for connection in list(connections):
        if isinstance(connection, GatewayHttpProtocol):
            if 0 < connection.head_deadline <= now:
                connection.head_timed_out()
            elif 0 < connection.idle_deadline <= now:
                connection.idle_timed_out()
    loop.call_later(interval, sweep_deadlines, loop, connections, interval)


def configure(limits: Limits) -> None:
    """This process's limits (the runner's; a worker process reads them from its settings)."""
    _State.limits = limits
