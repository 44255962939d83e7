"""What one request learns on its way through the gateway, shared by every layer through ``scope``."""

from __future__ import annotations

import os

from service.core.errors import Shape
from service.core.store import Team

SCOPE_KEY = "gateway"
"""``scope[SCOPE_KEY]`` holds the request's ``RequestInfo`` (set by ``RequestContext``)."""
REST_KEY = "gateway.rest"
"""``scope[REST_KEY]`` holds the path after the provider prefix (set by the provider's mount)."""
DISCONNECT_KEY = "gateway.on_disconnect"
"""Present in the scope when the server itself reports the client leaving: the gateway's HTTP protocol
calls ``scope[DISCONNECT_KEY]`` (when a request put a callable there) as soon as the connection is
lost before the response is complete, so the relay needs no task waiting on ``receive`` for it."""


_random_parts: list[str] = []
"""80 random bits as 20 hex digits each, drawn from the system's random source 128 at a time (one
``getrandom`` call for 128 requests rather than one each); emptied in a forked child, which must not
hand out its parent's."""
os.register_at_fork(after_in_child=_random_parts.clear)


def new_request_id(started_ms: int) -> str:
    """The gateway's own id for a request (``x-gateway-request-id``, the ledger row's key): when it
    started, in milliseconds since the epoch, as 12 hex digits, then 80 random bits as 20 more. Ids
    sort by time, so the SQLite ledger reads a time range by its key and needs no time index."""
    if not _random_parts:
        digits = os.urandom(10 * 128).hex()
        _random_parts.extend([digits[i : i + 20] for i in range(0, len(digits), 20)])
    return "%012x%s" % (started_ms, _random_parts.pop())  # noqa: UP031 (an f-string's spec costs twice)


class RequestInfo:
    """What one request has learned on its way through the gateway."""

    __slots__ = (
        "body",
        "bytes_in",
        "bytes_out",
        "cache_read_tokens",
        "cache_write_tokens",
        "client_request_id",
        "complete",
        "cost_micro_usd",
        "error_shape",
        "input_tokens",
        "limit_headers",
        "metadata",
        "metered",
        "model",
        "output_tokens",
        "provider",
        "reasoning_tokens",
        "request_id",
        "started",
        "started_ms",
        "status",
        "team",
        "truncated",
        "ttfb",
        "upstream_status",
        "upstream_wait",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.status = 0
        self.ttfb = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.provider: str | None = None
        self.team: Team | None = None
        self.upstream_status: int | None = None
        self.upstream_wait: float | None = None
        """Seconds from sending the upstream request to receiving its headers."""
        self.truncated = False
        """Set by a hop that ended a response on purpose before its end (a cut stream's error event
        ends it cleanly); a response that started and never sent its last part is truncated too."""
        self.complete = False
        """The last part of the response body was sent."""
        self.client_request_id: str | None = None
        """The client's own ``x-request-id``, when it sent one (recorded beside ours)."""
        self.metered = False
        """The relay read usage from this response (the fields below are what it found)."""
        self.model: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cache_read_tokens: int | None = None
        self.cache_write_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.cost_micro_usd: int | None = None
        self.started_ms = 0
        """When the request arrived, in milliseconds since the epoch (its id and its ledger row's
        time carry it; ``started`` is monotonic)."""
        self.metadata: str | None = None
        self.body: bytes | None = None
        """The whole request body, once a hop before the relay has read it (a model allow-list, a
        budget's estimate): the relay sends it as it is rather than receiving it (which a hop that
        reads the body leaves to nobody else)."""
        self.limit_headers: list[tuple[bytes, bytes]] | None = None
        """The ``x-ratelimit-*`` headers of the limits that admitted the request, for its response."""
        self.error_shape: Shape = "plain"
        """How this request's errors look: its provider's shape once the mount knows it."""
