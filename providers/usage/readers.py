"""The two readers: one for event streams, one for JSON bodies. Both hold a bounded part of the body.

Every public method catches everything: usage is read on the side of a relay that must never fail
because of it. A reader that hits an unexpected error gives up and answers an empty ``Usage``.
"""

from __future__ import annotations

from typing import Any

import orjson

from providers.usage.dialects import Dialect
from providers.usage.model import Usage
from providers.usage.scan import followed_by_object, object_after, string_after

MAX_EVENT = 1024 * 1024
"""An SSE event longer than this is not kept whole; only its last ``WINDOW_TAIL`` bytes are."""
WINDOW_HEAD = 4 * 1024
WINDOW_TAIL = 64 * 1024
"""A JSON body keeps its first ``WINDOW_HEAD`` bytes (for the model) and its last ``WINDOW_TAIL``
bytes (for the usage, which every provider puts near the end)."""
MAX_MODEL_TRIES = 8
"""Events parsed only to learn the model, at most (Azure names the model ``""`` in its first chunk)."""

_NO_WINDOW = bytearray()
"""A body reader's windows until it needs its own (never written to)."""
_BOUNDARIES = (b"\n\n", b"\n\r\n", b"\r\r")
"""A blank line ends an SSE event; lines end with LF, CRLF or CR. Each pattern is at most 3 bytes."""


def _last_boundary(buf: bytes | bytearray, start: int) -> int:
    """The index just past the last event boundary at or after ``start``, or -1."""
    end = -1
    for pattern in _BOUNDARIES:
        i = buf.rfind(pattern, start)
        if i >= 0:
            end = max(end, i + len(pattern))
    return end


def _first_boundary(buf: bytearray) -> int:
    """The index just past the first event boundary, or -1."""
    end = -1
    for pattern in _BOUNDARIES:
        i = buf.find(pattern)
        if i >= 0 and (end < 0 or i + len(pattern) < end):
            end = i + len(pattern)
    return end


def _event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event (LF line ends), ``None`` if none or ``[DONE]``.

    The event name is not needed: every format repeats it as ``type`` inside the data."""
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value[:1] == b" " else value)
    if not parts:
        return None
    data = parts[0] if len(parts) == 1 else b"\n".join(parts)
    return None if data == b"[DONE]" else data


def _keep_tail(window: bytearray, buf: bytearray, end: int, size: int) -> None:
    """Append ``buf[:end]`` to ``window``, keeping only its last ``size`` bytes (amortised)."""
    with memoryview(buf) as view:
        if end >= size:
            window[:] = view[end - size : end]
        else:
            window += view[:end]
            if len(window) > 2 * size:
                del window[: len(window) - size]


def _finish(dialect: Dialect, usage: Usage) -> Usage:
    if dialect.embeddings and usage.input_tokens is not None and usage.output_tokens is None:
        usage.output_tokens = 0
    return usage


def _scan_window(dialect: Dialect, usage: Usage, head: bytes | bytearray, tail: bytes | bytearray) -> None:
    """Read usage out of a window that is not whole JSON: the last usage object in ``tail`` (else in
    ``head``), the first model name in ``head`` (else the last in ``tail``)."""
    for key in dialect.usage_keys:
        found = object_after(tail, key, last=True) or (object_after(head, key, last=True) if head else None)
        if found is not None:
            dialect.usage_object(usage, found)
            break
    if usage.model is None and dialect.model_key is not None:
        usage.model = (string_after(head, dialect.model_key) if head else None) or string_after(
            tail, dialect.model_key, last=True
        )


class StreamReader:
    """Usage from a ``text/event-stream`` body.

    Per chunk: the chunk is appended to the carried partial event, the last event boundary is looked
    for in the new bytes only, and the complete events before it are searched for the dialect's
    usage key with an object value (and, while the model is unknown, for its model key). Only the
    events that have one are split out and parsed; the rest is dropped unparsed. The partial event
    after the boundary is carried over; past ``max_event`` bytes it is not kept but its tail is, and
    the usage object is cut out of that tail when the event ends (a Responses API
    ``response.completed`` event repeats the whole output and can be megabytes).
    """

    __slots__ = (
        "_buf",
        "_dialect",
        "_failed",
        "_keys",
        "_max_event",
        "_model_tries",
        "_oversized",
        "_pending",
        "_usage",
    )

    def __init__(self, dialect: Dialect, max_event: int = MAX_EVENT) -> None:
        self._dialect = dialect
        self._keys = tuple((key, key + b":{", key + b":null") for key in dialect.usage_keys)
        self._max_event = max_event
        self._usage = Usage()
        self._buf = bytearray()
        self._oversized: bytearray | None = None
        self._pending: bytes | None = None
        self._model_tries = 0
        self._failed = False

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        try:
            self._feed(chunk)
        except Exception:
            self._fail()

    def result(self) -> Usage:
        if self._failed:
            return Usage()
        try:
            buf = self._buf
            if self._oversized is not None:
                _keep_tail(self._oversized, buf, len(buf), WINDOW_TAIL)
                self._close_oversized()
            elif buf:  # the last event without its blank line, or a cut one (then its JSON fails)
                self._event(bytes(buf))
            buf.clear()
            if self._pending is not None:
                self._apply(self._pending)
                self._pending = None
            return _finish(self._dialect, self._usage)
        except Exception:
            self._fail()
            return Usage()

    def _fail(self) -> None:
        self._failed = True
        self._buf = bytearray()
        self._oversized = None
        self._pending = None

    def _feed(self, chunk: bytes) -> None:
        buf = self._buf
        data: bytes | bytearray
        if buf or self._oversized is not None:
            start = max(0, len(buf) - 2)  # a boundary may begin in the carried bytes
            buf += chunk
            if self._oversized is not None:
                end = _first_boundary(buf)
                if end < 0:
                    keep = len(buf) - 2
                    if keep > 0:
                        _keep_tail(self._oversized, buf, keep, WINDOW_TAIL)
                        del buf[:keep]
                    return
                _keep_tail(self._oversized, buf, end, WINDOW_TAIL)
                del buf[:end]
                self._close_oversized()
                start = 0
            data = buf
        else:  # nothing carried (chunks often hold whole events): work on the chunk, copy nothing
            start = 0
            data = chunk
        if data.find(b"\r", start) < 0:
            end = data.rfind(b"\n\n", start)
            end = end + 2 if end >= 0 else -1
        else:
            end = _last_boundary(data, start)
        if end > 0:
            if self._wanted(data, end):
                region = bytes(data[:end]) if end < len(data) or data is buf else chunk
                if region.find(b"\r") >= 0:
                    region = region.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                for event in region.split(b"\n\n"):
                    self._event(event)
            if data is buf:
                del buf[:end]
            elif end < len(chunk):
                with memoryview(chunk) as view:
                    buf += view[end:]
        elif data is chunk:
            buf += chunk
        if len(buf) > self._max_event:
            self._oversized = bytearray()
            keep = len(buf) - 2
            _keep_tail(self._oversized, buf, keep, WINDOW_TAIL)
            del buf[:keep]

    def _wants_model(self) -> bool:
        return self._usage.model is None and self._dialect.model_key is not None and self._model_tries < MAX_MODEL_TRIES

    def _wanted(self, data: bytes | bytearray, end: int) -> bool:
        """Whether ``data[:end]`` may hold usage (or the model, while it is unknown): C-speed
        substring searches first; the careful look only when a key is there but the fast forms
        (``"usage":{``, ``"usage":null``) do not settle it."""
        for key, compact, null in self._keys:
            if data.find(compact, 0, end) >= 0:
                return True
            n = data.count(key, 0, end)
            if n and n != data.count(null, 0, end) and followed_by_object(data, key, 0, end):
                return True
        model_key = self._dialect.model_key
        return model_key is not None and self._wants_model() and data.find(model_key, 0, end) >= 0

    def _event(self, event: bytes) -> None:
        dialect = self._dialect
        has_usage = any(followed_by_object(event, key) for key in dialect.usage_keys)
        if not has_usage and not (self._wants_model() and event.find(dialect.model_key or b"") >= 0):
            return
        data = _event_data(event)
        if data is None:
            return
        if has_usage and dialect.last_wins:
            self._pending = data  # parsed once, at the end
            return
        if not has_usage:
            self._model_tries += 1
        self._apply(data)

    def _apply(self, data: bytes) -> None:
        try:
            parsed: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        self._dialect.event(self._usage, parsed)

    def _close_oversized(self) -> None:
        window = self._oversized
        self._oversized = None
        if window is not None:
            _scan_window(self._dialect, self._usage, b"", window)


class BodyReader:
    """Usage from a JSON body (``application/json``, also Gemini's streamed JSON array).

    Per chunk only a copy into a bounded window: the first ``head`` bytes and the last ``tail``
    bytes. At the end a body that fit whole is parsed whole; a larger one (or a cut one, which no
    longer parses) has its usage object and model cut out of the window. A body that arrives as one
    chunk no larger than the windows (most answers) is only referred to, not copied.
    """

    __slots__ = ("_dialect", "_failed", "_head", "_head_size", "_tail", "_tail_size", "_total", "_whole")

    def __init__(self, dialect: Dialect, head: int = WINDOW_HEAD, tail: int = WINDOW_TAIL) -> None:
        self._dialect = dialect
        self._head_size = head
        self._tail_size = tail
        self._head = self._tail = _NO_WINDOW  # windows are made for a body of several chunks
        self._total = 0
        self._failed = False
        self._whole: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        if not self._total and len(chunk) <= self._head_size + self._tail_size:
            self._whole = chunk
            self._total = len(chunk)
            return
        whole, self._whole = self._whole, None
        if whole is not None:  # a second chunk: the first goes into the windows after all
            self._total = 0
            self._feed_window(whole)
        self._feed_window(chunk)

    def _feed_window(self, chunk: bytes) -> None:
        try:
            if self._head is _NO_WINDOW:
                self._head = bytearray()
                self._tail = bytearray()
            self._total += len(chunk)
            with memoryview(chunk) as view:
                room = self._head_size - len(self._head)
                if room > 0:
                    self._head += view[:room]
                    view = view[room:]
                tail = self._tail
                size = self._tail_size
                if len(view) >= size:
                    tail[:] = view[len(view) - size :]
                elif view:
                    tail += view
                    if len(tail) > 2 * size:
                        del tail[: len(tail) - size]
        except Exception:
            self._failed = True
            self._head = bytearray()
            self._tail = bytearray()

    def result(self) -> Usage:
        if self._failed:
            return Usage()
        try:
            usage = Usage()
            dialect = self._dialect
            whole = self._whole
            if whole is not None or self._total == len(self._head) + len(self._tail):  # nothing dropped
                body = whole if whole is not None else bytes(self._head + self._tail)
                try:
                    parsed: Any = orjson.loads(body)
                except orjson.JSONDecodeError:  # cut short, or not JSON after all
                    _scan_window(dialect, usage, body, body)
                else:
                    dialect.event(usage, parsed)
            else:
                _scan_window(dialect, usage, self._head, self._tail)
            return _finish(dialect, usage)
        except Exception:
            self._failed = True
            return Usage()
