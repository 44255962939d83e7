"""Request context: request id, timing, the error boundary, and one JSON access line per request.

The outermost middleware. It creates the ``RequestInfo`` that the layers below fill in (provider,
team, upstream status, bytes in) and reads it back for the access line once the response is done.

It is the one error boundary of the proxy path: a hop refuses a request by raising a
``GatewayError`` before the response has started, and this answers it in the request's provider
shape with the request id; a store that cannot be reached is the store's 503; anything unexpected is
a JSON 500 in the same shape, logged with its traceback, so a client never sees a stack trace and
uvicorn never prints one. A response that started and did not finish is ``truncated``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.logging import AccessWriter, mask_keys, utc_iso_millis
from service.core.errors import GatewayError, send_error, store_unavailable
from service.core.ledger import Ledger, LedgerValues
from service.core.metrics import Metrics
from service.core.request import SCOPE_KEY, RequestInfo, new_request_id
from service.core.store import StoreUnavailableError, Team

error_log = structlog.get_logger("gateway.error")

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
UNEXPECTED = GatewayError("The gateway failed to handle this request.")


def _client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's own ``x-request-id`` when it is sane (recorded beside ours, never instead)."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(candidate) and mask_keys(candidate) == candidate:
                return candidate
            break
    return None


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _usd(micro: int | None) -> float | None:
    return None if micro is None else micro / 1_000_000


def _ledger_row(
    info: RequestInfo, team: Team, duration_ms: float, ttfb_ms: float | None, truncated: bool
) -> LedgerValues:
    # a plain tuple in the fields' order: made and bound at a fraction of a LedgerRow's cost
    return (
        info.request_id,
        info.client_request_id,
        utc_iso_millis(info.started_ms),  # at: the time the request id carries
        team.team_id,
        team.key_id,
        info.provider or "",
        info.model,
        info.status or 499,
        info.input_tokens,
        info.output_tokens,
        info.cache_read_tokens,
        info.cache_write_tokens,
        info.reasoning_tokens,
        info.cost_micro_usd,
        duration_ms,
        ttfb_ms,
        1 if not truncated and info.status != 0 else 0,  # complete
    )


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
        started_ms = int(time.time() * 1000)
        info = RequestInfo(new_request_id(started_ms), started)  # always the gateway's own, unique
        info.client_request_id = _client_request_id(scope["headers"])
        info.started_ms = started_ms
        scope[SCOPE_KEY] = info
        id_header = (b"x-gateway-request-id", info.request_id.encode())

        def send_with_id(message: Message) -> Awaitable[None]:
            # not async: the server's own send is handed back to be awaited (one coroutine fewer for
            # every message of every response, every event of a stream)
            if message["type"] == "http.response.body":
                info.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    info.complete = True
            else:
                info.status = message["status"]
                info.ttfb = time.perf_counter()
                message["headers"] = [*message.get("headers", ()), id_header]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except GatewayError as error:
            await self._refuse(error, info, send_with_id)
        except StoreUnavailableError:
            await self._refuse(store_unavailable(), info, send_with_id)
        except Exception as exc:
            error_log.error("unhandled_error", request_id=info.request_id, exc_info=exc)
            await self._refuse(UNEXPECTED, info, send_with_id)
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
            truncated = info.truncated or (info.status != 0 and not info.complete)
            duration_ms = round((end - started) * 1000, 3)
            ttfb_ms = round(ttfb * 1000, 3) if ttfb is not None else None
            if info.metered and team is not None and info.provider is not None and info.model is not None:
                self.metrics.usage(
                    info.provider,
                    info.model,
                    team.team_id,
                    info.input_tokens,
                    info.output_tokens,
                    info.cache_read_tokens,
                    info.cache_write_tokens,
                    info.reasoning_tokens,
                    info.cost_micro_usd,
                )
            if team is not None and info.provider is not None:
                ledger: Ledger | None = scope["state"].get("ledger")
                if ledger is not None:
                    ledger.record(_ledger_row(info, team, duration_ms, ttfb_ms, truncated))
            if self.write_access is not None:
                self.write_access(
                    {
                        "event": "request",
                        "request_id": info.request_id,
                        "client_request_id": info.client_request_id,
                        "method": scope["method"],
                        "path": _logged_path(scope["path"]),
                        "status": info.status or 499,
                        "duration_ms": duration_ms,
                        "ttfb_ms": ttfb_ms,
                        "upstream_status": info.upstream_status,
                        "bytes_in": info.bytes_in,
                        "bytes_out": info.bytes_out,
                        "team_id": team.team_id if team is not None else None,
                        "key_id": team.key_id if team is not None else None,
                        "provider": info.provider,
                        "model": info.model,
                        "input_tokens": info.input_tokens,
                        "output_tokens": info.output_tokens,
                        "cost_usd": _usd(info.cost_micro_usd),
                        "truncated": truncated,
                    }
                )
        # the request is over: what its scope holds (its info, the relay's exchange, a copy of the
        # app's state, its headers) goes now, not when its connection's next request begins; and the
        # reference cycle the scope is part of (through the relay's exchange and the request's task) is
        # broken, so ~40 objects a request are freed here rather than piling up for the garbage
        # collector. Not when the request was cancelled or no response was started: uvicorn may still
        # answer it (its own 500) and reads the scope to do so.
        if info.status:
            headers = scope["headers"]
            if type(headers) is list:
                headers.clear()
            scope.clear()

    @staticmethod
    async def _refuse(error: GatewayError, info: RequestInfo, send: Send) -> None:
        if info.status:  # too late to answer: the response stays cut short (truncated)
            error_log.warning("error_after_response_started", request_id=info.request_id, error=error.message)
            return
        await send_error(send, error, info.error_shape, info.request_id)
