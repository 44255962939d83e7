"""Responses cut short: the provider's own error event for streams, and one log line per cut.

A response cut short (the upstream resets, goes idle past ``STREAM_IDLE_TIMEOUT_SECONDS``, or the
server's graceful shutdown runs out) is logged once at warning level by the relay and marked
``truncated``. An event stream gets the provider's own error event and a proper end, so SDKs raise
instead of returning a short answer; any other body ends abruptly, and uvicorn's own error line for
that is left out (the relay's warning stands in for it).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from service.core.errors import Shape, UpstreamTruncated, render

_BLANK_LINE_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def error_event(shape: Shape, message: str, request_id: str, previous: bytes) -> bytes:
    """The provider's own error event for a stream cut short: ``event: error`` for Anthropic, a
    ``data:`` event holding the provider's error object for the others. When the stream stopped
    inside an event, a blank line first ends it, so the error is an event of its own."""
    body = render(UpstreamTruncated(message), shape, request_id)
    event = b"event: error\ndata: " + body + b"\n\n" if shape == "anthropic" else b"data: " + body + b"\n\n"
    return b"\n\n" + event if previous and not previous.endswith(_BLANK_LINE_ENDS) else event


# Set when the relay ends a response without completing it on purpose (after logging why), so
# uvicorn's "returned without completing response" error line for it is left out: one line per cut.
ENDED_ON_PURPOSE: ContextVar[bool] = ContextVar("gateway_ended_on_purpose", default=False)
_INCOMPLETE = "ASGI callable returned without completing response."
_SHUTDOWN_CANCEL = "Cancel %s running task(s), timeout graceful shutdown exceeded"


class QuietCuts(logging.Filter):
    """On ``uvicorn.error``: drops the "without completing response" line for responses the relay
    ended abruptly on purpose (it logged them itself, at warning level), and logs uvicorn's "timeout
    graceful shutdown exceeded" at warning level: a deploy outlasting SHUTDOWN_GRACE_SECONDS is
    expected, and each stream it cuts gets its own warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _INCOMPLETE:
            return not ENDED_ON_PURPOSE.get()
        if record.msg == _SHUTDOWN_CANCEL and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_QUIET_CUTS = QuietCuts()


def quiet_cuts_on_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _QUIET_CUTS not in logger.filters:
        logger.addFilter(_QUIET_CUTS)
