"""Structured logging: one JSON object per line on stdout, flushed per line.

The gateway's own events go through structlog with orjson; uvicorn's loggers are routed through
the same renderer so every line on stdout is JSON an observability pipeline can ingest.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _dumps(event: Any, **_: Any) -> bytes:
    return orjson.dumps(event, default=str)


def configure_logging(level: str) -> None:
    numeric = _LEVELS[level]
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(
                serializer=lambda e, **_: orjson.dumps(e, default=str).decode()
            ),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    for name in ("uvicorn", "uvicorn.error", "aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(max(numeric, logging.INFO) if name == "asyncio" else numeric)
    logging.getLogger("uvicorn.access").disabled = True
