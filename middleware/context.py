"""Request context: request id, timing, and one JSON access line per request.

The outermost middleware. It creates the ``RequestInfo`` that the layers below fill in (provider,
team, upstream status, bytes in, truncation) and reads it back for the access line once the
response is done. It also answers any unexpected failure below it with a JSON 500, so a client
never sees a stack trace and uvicorn never prints one.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.logging import AccessWriter, mask_keys
from service.errors import GatewayError, render
from service.metrics import Metrics

error_log = structlog.get_logger("gateway.error")

SCOPE_KEY = "gateway"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class RequestInfo:
    """What one request has learned on its way through the gateway."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "error_shape",
        "metadata",
        "provider",
        "request_id",
        "started",
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
        self.team: Any = None
        self.upstream_status: int | None = None
        self.upstream_wait: float | None = None
        """Seconds from sending the upstream request to receiving its headers."""
        self.truncated = False
        self.metadata: str | None = None
        self.error_shape: Any = "plain"


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(candidate) and mask_keys(candidate) == candidate:
                return candidate
            break
    return os.urandom(12).hex()


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _logged_path(path: str) -> str:
    """Paths are logged without query strings, and anything key-shaped in them (``/tokens/{key}``,
    ``/x/%20SK_…``, ``xsk_…``) only as its first 8 characters."""
    return mask_keys(path)


class RequestContext:
    def __init__(self, app: ASGIApp, *, write_access: AccessWriter | None, metrics: Metrics) -> None:
        self.app = app
        self.write_access = write_access
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        info = RequestInfo(_request_id(scope["headers"]), started)
        scope[SCOPE_KEY] = info
        id_header = (b"x-gateway-request-id", info.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.body":
                info.bytes_out += len(message.get("body", b""))
            else:
                info.status = message["status"]
                info.ttfb = time.perf_counter()
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            error_log.error("unhandled_error", request_id=info.request_id, exc_info=exc)
            if info.status:
                info.truncated = True
            else:
                await send_with_id({"type": "http.response.start", "status": 500, "headers": _JSON_HEADERS})
                body = render(
                    GatewayError("The gateway failed to handle this request."),
                    info.error_shape,
                    info.request_id,
                )
                await send_with_id({"type": "http.response.body", "body": body})
        finally:
            end = time.perf_counter()
            team = info.team
            ttfb = info.ttfb - started if info.ttfb else None
            wait = info.upstream_wait
            self.metrics.request(
                info.provider or "none",
                info.status or 499,
                team.team_id if team is not None else "",
                end - started,
                ttfb,
                ttfb - wait if ttfb is not None and wait is not None else None,
            )
            if info.provider is None:
                info.bytes_in = _declared_length(scope["headers"])
            if self.write_access is not None:
                self.write_access(
                    {
                        "event": "request",
                        "request_id": info.request_id,
                        "method": scope["method"],
                        "path": _logged_path(scope["path"]),
                        "status": info.status or 499,
                        "duration_ms": round((end - started) * 1000, 3),
                        "ttfb_ms": round(ttfb * 1000, 3) if ttfb is not None else None,
                        "upstream_status": info.upstream_status,
                        "bytes_in": info.bytes_in,
                        "bytes_out": info.bytes_out,
                        "team_id": team.team_id if team is not None else None,
                        "key_id": team.key_id if team is not None else None,
                        "provider": info.provider,
                        "truncated": info.truncated,
                    }
                )
