"""Structured logging: one JSON object per line on stdout, flushed per line.

The gateway's own events go through structlog with one processor that adds the level and an ISO
timestamp and renders with orjson (the access line is written on every request, so its path is
kept short). uvicorn's loggers are routed through structlog's standard-library formatter so every
line on stdout is JSON an observability pipeline can ingest.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import structlog
import structlog.tracebacks

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_METHOD_LEVELS = {"warn": "warning", "exception": "error", "msg": "info"}
# Tracebacks as data, without frame locals: locals hold keys, tokens and headers.
_tracebacks = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
_second: list[Any] = [None, ""]
"""The second formatted last (seconds since the epoch) and its text up to the decimal point, the
point included."""
_DIGITS_Z = tuple("%03dZ" % n for n in range(1000))  # noqa: UP031
"""0 to 999 as three digits and ``Z``: looked up rather than formatted (~0.7k instructions against
~2.6k for a format), as every request's ledger row's time is."""
# Anything shaped like a team key, in any case and wherever it sits in a value (``xsk_…``, ``"sk_…"``,
# ``Bearer sk_…``), and any hex run as long as a key's secret part (60 or more: request and trace ids,
# at most 32 or 40, stay whole).
_KEY_LIKE = re.compile(r"(sk_[0-9a-f]{5})[0-9a-f]+|([0-9a-f]{5})[0-9a-f]{55,}", re.IGNORECASE)


def mask_keys(text: str) -> str:
    """``text`` with every key-shaped run cut to its first characters: ``sk_1a2b3…``."""
    if len(text) < 60 and "k_" not in text and "K_" not in text:
        return text  # nothing key-shaped can be in it (the common case: skip the expression)
    return _KEY_LIKE.sub(lambda m: (m.group(1) or m.group(2)) + "…", text)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_keys(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def mask_event(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor: every string in the event (tracebacks included) with keys masked."""
    for name, value in event_dict.items():
        event_dict[name] = _masked(value)
    return event_dict


def utc_iso(seconds: float, *, milliseconds: bool = False) -> str:
    """A UTC ISO 8601 time, with microseconds (logs) or milliseconds (the API's and the ledger's
    times); the part up to the second is formatted once per second."""
    whole = int(seconds)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
    text: str = _second[1]
    if milliseconds:  # (a fraction under 1 times 1000 stays under 1000 in floating point)
        return text + _DIGITS_Z[int((seconds - whole) * 1000)]
    # printf-style (%d truncates as int() does): a format spec in an f-string costs twice as much
    return text + "%06dZ" % ((seconds - whole) * 1_000_000)  # noqa: UP031


def utc_iso_millis(ms: int) -> str:
    """``utc_iso`` with milliseconds of a whole number of milliseconds since the epoch, exactly (the
    ledger's times, which request ids carry)."""
    whole, millis = divmod(ms, 1000)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
    text: str = _second[1]
    return text + _DIGITS_Z[millis]


def iso_timestamp() -> str:
    """Now, as log lines show it: UTC ISO 8601 with microseconds."""
    return utc_iso(time.time())


def _json_text(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def render(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> bytes:
    event_dict["level"] = _METHOD_LEVELS.get(method_name, method_name)
    event_dict["timestamp"] = iso_timestamp()
    if "exc_info" in event_dict:
        event_dict = _tracebacks(logger, method_name, event_dict)
    return orjson.dumps(mask_event(logger, method_name, event_dict), default=str)


AccessWriter = Callable[[dict[str, Any]], None]


def configure_logging(level: str) -> AccessWriter | None:
    """Configure structlog and uvicorn's loggers; return the access-line writer (``None`` when
    ``level`` is above ``info``).

    The access line is written on every request, so it skips the bound-logger wrapper and the
    buffered file: the same fields as ``render`` adds, one orjson call, one ``write`` of the whole
    line to stdout's descriptor (which keeps lines whole, as structlog's own flushed lines are).
    """
    numeric = _LEVELS[level]
    output = structlog.BytesLogger(sys.stdout.buffer)
    structlog.configure(
        processors=[render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: output,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _tracebacks,
            mask_event,
            structlog.processors.JSONRenderer(serializer=lambda e, **_: orjson.dumps(e, default=str).decode()),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    # asyncpg retries reconnecting on its own during a database outage; the gateway reports the
    # outage itself (store_unavailable), so only asyncpg's errors are worth a line
    floors = {"asyncio": logging.INFO, "asyncpg": logging.ERROR}
    for name in ("uvicorn", "uvicorn.error", "aiohttp", "asyncio", "asyncpg"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(max(numeric, floors.get(name, logging.NOTSET)))
    logging.getLogger("uvicorn.access").disabled = True

    if numeric > logging.INFO:
        return None

    stdout = sys.stdout.buffer
    fileno = stdout.fileno()

    def write_access(event: dict[str, Any]) -> None:
        event["level"] = "info"
        event["timestamp"] = iso_timestamp()
        stdout.flush()  # nothing may be left in the buffer ahead of this line (normally a no-op)
        os.write(fileno, orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))

    return write_access
