"""Metering OpenAI-format streams whose client did not ask for usage, invisibly to that client.

OpenAI-format streams carry usage only when the request sets ``stream_options.include_usage``. When
a client streams without it (``USAGE_STREAM_OPTIONS=inject``), the gateway sets it on the request
and takes the one extra event it causes, the last chunk with ``"choices": []`` and the usage, out
of the stream again, so the client gets the stream the upstream would have sent it. The upstream
then also writes ``"usage": null`` in the other chunks; those stay, as the upstream sent them. A
client that asked for usage gets its request and its stream untouched.
"""

from __future__ import annotations

import orjson

_USAGE_ONLY = b'"choices":[]'
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
MAX_PENDING = 64 * 1024
"""The most of an unfinished event held back; past it the bytes go on (memory and delay stay bounded)."""


def eligible(method: str, rest: str) -> bool:
    """Chat completions requests, the one endpoint whose streams need the option."""
    return method == "POST" and rest.partition("?")[0].rstrip("/").endswith("chat/completions")


def with_usage_requested(body: bytes) -> bytes | None:
    """The body with ``stream_options.include_usage`` set, or ``None`` when it is not a streamed
    request, already asks for usage, or is not a JSON object (it then goes up unchanged)."""
    if body.find(b'"stream"') < 0:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("stream") is not True:
        return None
    options = value.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    value["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(value)


def _last_event_end(data: bytes) -> int:
    """Index just past the last complete event in ``data`` (0: none complete yet)."""
    best = 0
    for end in _EVENT_ENDS:
        found = data.rfind(end)
        if found >= 0:
            best = max(best, found + len(end))
    return best


def _may_be_usage_only(events: bytes) -> bool:
    """Whether ``events`` may hold the usage-only event (a byte search, before any parsing)."""
    return events.replace(b" ", b"").find(_USAGE_ONLY) >= 0 and events.find(b'"usage"') >= 0


def _is_usage_only(event: bytes) -> bool:
    """Whether ``event`` is the usage-only chunk: ``"choices": []`` and a usage object. Another
    chunk without choices (Azure's first, with its prompt filter results and ``"usage": null``)
    is not."""
    if not _may_be_usage_only(event):
        return False
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    try:
        value = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and value.get("choices") == [] and isinstance(value.get("usage"), dict)


class UsageChunkHider:
    """Passes an injected stream on without its usage-only event.

    Complete events go on as they come; a partial event at the end of a chunk waits for its end
    (an event client dispatches only complete events, so nothing it could act on is delayed)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def __call__(self, chunk: bytes, last: bool) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        end = len(data) if last else _last_event_end(data)
        if len(data) - end > MAX_PENDING:
            end = len(data)  # an event this long is not the small usage chunk: it goes on unheld
        ready, self.pending = data[:end], data[end:]
        if b'"choices"' not in ready or not _may_be_usage_only(ready):
            return ready
        kept = []
        start = 0
        while start < len(ready):
            stop = self._next_end(ready, start)
            event = ready[start:stop]
            if not _is_usage_only(event):
                kept.append(event)
            start = stop
        return b"".join(kept)

    @staticmethod
    def _next_end(data: bytes, start: int) -> int:
        """Index just past the first event end at or after ``start`` (the data's end if none)."""
        ends = [found + len(end) for end in _EVENT_ENDS if (found := data.find(end, start)) >= 0]
        return min(ends) if ends else len(data)
