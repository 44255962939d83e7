"""The shared relay: one provider request in, the upstream's answer streamed back unchanged.

Bytes in, bytes out: the request body is streamed up as it arrives (or sent as is when it came in
one piece), the upstream's status, headers and body chunks are passed back as they arrive, never
decompressed, parsed or buffered whole. The upstream response is released here, also when the
client disconnects, which cancels the upstream call at once.

What a team sends is filtered on the way up: no credential of any provider (the team key never
leaves the gateway, whichever header, cookie or query parameter it was put in), and of Cloudflare's
``cf-aig-*`` controls only those a team may set (caching, timeout, retries); logging, cost and
attribution stay the operator's.

A response cut short (the upstream resets, goes idle past ``STREAM_IDLE_TIMEOUT_SECONDS``, or the
server's graceful shutdown runs out) is logged once at warning level and marked ``truncated`` in
the access line. An event stream then gets the provider's own error event and a proper end, so
SDKs raise instead of returning a short answer; any other body ends abruptly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from urllib.parse import unquote_to_bytes

import aiohttp
import structlog
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from config import Settings
from middleware.context import SCOPE_KEY, RequestInfo
from providers.base import Provider
from providers.registry import credential_headers
from providers.upstream import Upstream
from service.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    ServiceUnavailable,
    Shape,
    UpstreamTimeout,
    UpstreamUnavailable,
    render,
)
from service.metrics import Metrics
from service.respond import send_error

log = structlog.get_logger("gateway.relay")

REST_KEY = "gateway.rest"

# Never forwarded up: hop-by-hop headers, the host, the team's credentials, and the headers the
# gateway sets itself.
_DROP_UP = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"authorization",
        b"x-api-key",
        b"cookie",
        b"cf-aig-authorization",
        b"cf-aig-metadata",
    }
)
# The Cloudflare AI Gateway request headers a team may set; every other ``cf-aig-*`` header
# (cf-aig-collect-log, cf-aig-collect-log-payload, cf-aig-custom-cost, cf-aig-event-id,
# cf-aig-log-id, cf-aig-dlp…, cf-aig-byok…, cf-aig-authorization; cf-aig-metadata is merged by the
# gateway) changes logging, cost or attribution and is the operator's. CF_AIG_ALLOWED_HEADERS adds
# names. From Cloudflare's documentation:
#   caching          https://developers.cloudflare.com/ai-gateway/features/caching/
#                    cf-aig-cache-ttl, cf-aig-skip-cache, cf-aig-cache-key (per team, see
#                    team_cache_key), and the older cf-cache-ttl / cf-skip-cache, which are not
#                    cf-aig-* and pass as any header
#   request handling https://developers.cloudflare.com/ai-gateway/configuration/request-handling/
#                    cf-aig-request-timeout, cf-aig-max-attempts, cf-aig-retry-delay, cf-aig-backoff
#   all headers      https://developers.cloudflare.com/ai-gateway/glossary/
TEAM_CF_AIG_HEADERS = frozenset(
    {
        "cf-aig-cache-ttl",
        "cf-aig-skip-cache",
        "cf-aig-cache-key",
        "cf-aig-request-timeout",
        "cf-aig-max-attempts",
        "cf-aig-retry-delay",
        "cf-aig-backoff",
    }
)
# A gateway key anywhere in a header value or query parameter: that header or parameter stays here.
GATEWAY_KEY = re.compile(rb"(?i)sk_[0-9a-f]{64}")
# Query strings worth a closer look: a ``key`` parameter (Google's API key), or something that could
# hold a gateway key (its underscore, or percent-encoding).
_SUSPECT_QUERY = re.compile(rb"(?i)key|_|%")
# Never passed back down: hop-by-hop headers (the server frames the response itself) and the
# upstream's Date (the server sends its own; a response has one).
_DROP_DOWN = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"te",
        b"date",
    }
)


# A request still running after this long gets a task that watches for the client leaving; a
# short one never pays for it. Either way a disconnect cancels the upstream call within this bound.
WATCH_AFTER_SECONDS = 0.02
SKIP_CACHE = ("cf-aig-skip-cache", "true")
NOT_READING = float("inf")
MAX_CACHED_URLS = 1024
MAX_CACHED_PATH = 512


def _without_connection_options(headers: list[tuple[str, str]], connection: bytes) -> list[tuple[str, str]]:
    """Drop the headers the client's ``Connection`` header names: they are for this hop only."""
    named = {token.strip().lower() for token in connection.decode("latin-1").split(",")}
    named -= {"keep-alive", "close", "upgrade", ""}
    return [(k, v) for k, v in headers if k not in named] if named else headers


def without_credentials(query: bytes) -> bytes:
    """The query string to forward: without ``key`` (Google's API key parameter, which the Gemini
    REST API reads) and without any parameter holding a gateway key, however it is encoded."""
    if not _SUSPECT_QUERY.search(query):
        return query
    kept = []
    for part in query.split(b"&"):
        decoded = unquote_to_bytes(part.replace(b"+", b" "))
        if decoded.partition(b"=")[0].strip().lower() == b"key" or GATEWAY_KEY.search(decoded):
            continue
        kept.append(part)
    return b"&".join(kept)


def team_cache_key(info: RequestInfo, scope: Scope, client_key: bytes | None, body: bytes, query: bytes) -> str:
    """Cloudflare's cache key for a team: the team and the client's own key, or, without one, the
    team and the request itself (method, path, query, body), so teams never share cached answers."""
    digest = hashlib.sha256(info.team.team_id.encode() + b"\0")
    if client_key is not None:
        digest.update(b"key\0" + client_key)
    else:
        digest.update(b"\0".join((b"request", scope["method"].encode(), scope["raw_path"], query, body)))
    return digest.hexdigest()


class UpstreamTruncated(GatewayError):
    status = 502
    openai_type = "api_error"
    anthropic_type = "api_error"
    code = "upstream_truncated"


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
_ENDED_ON_PURPOSE: ContextVar[bool] = ContextVar("gateway_ended_on_purpose", default=False)
_INCOMPLETE = "ASGI callable returned without completing response."
_SHUTDOWN_CANCEL = "Cancel %s running task(s), timeout graceful shutdown exceeded"


class QuietCuts(logging.Filter):
    """On ``uvicorn.error``: drops the "without completing response" line for responses the relay
    ended abruptly on purpose (it logged them itself, at warning level), and logs uvicorn's "timeout
    graceful shutdown exceeded" at warning level: a deploy outlasting SHUTDOWN_GRACE_SECONDS is
    expected, and each stream it cuts gets its own warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _INCOMPLETE:
            return not _ENDED_ON_PURPOSE.get()
        if record.msg == _SHUTDOWN_CANCEL and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_QUIET_CUTS = QuietCuts()


def quiet_cuts_on_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _QUIET_CUTS not in logger.filters:
        logger.addFilter(_QUIET_CUTS)


class ClientGone(Exception):
    """The client disconnected (or overran the size limit) before the request body was complete."""


class Relay:
    def __init__(self, provider: Provider, upstream: Upstream | str, settings: Settings) -> None:
        self.provider = provider
        self.upstream = upstream if isinstance(upstream, Upstream) else None
        self.unavailable = ServiceUnavailable(upstream) if isinstance(upstream, str) else None
        self.via_gateway = self.upstream is not None and self.upstream.via_gateway
        self.added = list(self.upstream.headers) if self.upstream else []
        self.scope_cache = self.via_gateway and settings.cache_scope == "team"
        # every provider's credential headers, not only this one's: a team key put in another
        # provider's header (x-goog-api-key on /openai) must not travel either
        credentials = credential_headers(settings.providers_file) | set(provider.team_key_headers)
        drop = set(_DROP_UP) | {h.encode() for h in credentials}
        if self.scope_cache:
            drop.add(b"cf-aig-cache-key")
        self.drop = frozenset(drop)
        # direct, no cf-aig-* header leaves the gateway
        allowed = TEAM_CF_AIG_HEADERS | set(settings.cf_aig_allowed_headers) if self.via_gateway else set()
        self.cf_aig_allowed = frozenset(h.encode() for h in allowed)
        self.timeout = settings.upstream_timeout_seconds
        self.idle_timeout = settings.stream_idle_timeout_seconds
        self.max_body = settings.max_request_bytes
        self._urls: dict[str, URL] = {}
        quiet_cuts_on_uvicorn()

    def _url(self, upstream: Upstream, rest: str, query: bytes) -> URL:
        """The upstream URL; the part before the query is built once per path (yarl parsing is not free)."""
        if query:
            return URL(upstream.url(rest) + "?" + query.decode("latin-1"), encoded=True)
        url = self._urls.get(rest)
        if url is None:
            url = URL(upstream.url(rest), encoded=True)
            if len(rest) <= MAX_CACHED_PATH:
                if len(self._urls) >= MAX_CACHED_URLS:
                    self._urls.clear()
                self._urls[rest] = url
        return url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        upstream = self.upstream
        if upstream is None:
            assert self.unavailable is not None
            await send_error(send, self.unavailable, info.error_shape, info.request_id)
            return
        query = scope["query_string"]
        if query:
            query = without_credentials(query)
        try:
            url = self._url(upstream, scope[REST_KEY], query)
        except BadRequest as error:
            await send_error(send, error, info.error_shape, info.request_id)
            return

        drop = self.drop
        cf_aig_allowed = self.cf_aig_allowed
        direct = not self.via_gateway
        headers: list[tuple[str, str]] = []
        declared_length = client_cache_key = None
        wants_cache = skips_cache = False
        connection = None
        for name, value in scope["headers"]:
            if name in drop:
                if name == b"cf-aig-cache-key":
                    client_cache_key = value
                    wants_cache = True
                elif name == b"connection":
                    connection = value
                continue
            if name.startswith(b"cf-aig-") and name not in cf_aig_allowed:
                continue
            if b"_" in value and GATEWAY_KEY.search(value):  # a team key pasted where it does not belong
                continue
            if name == b"content-length":
                declared_length = value
            elif name == b"cf-aig-cache-ttl" or name == b"cf-cache-ttl":
                wants_cache = True
            elif name == b"cf-aig-skip-cache":
                skips_cache = True
            headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        if connection is not None:
            headers = _without_connection_options(headers, connection)
        headers.extend(self.added)
        if not direct:
            headers.append(("cf-aig-metadata", info.metadata or ""))
        if declared_length is not None and (not declared_length.isdigit() or int(declared_length) > self.max_body):
            await send_error(send, self._too_large(), info.error_shape, info.request_id)
            return

        exchange = _Exchange(receive)
        try:
            first = await receive()
            if first["type"] == "http.disconnect":
                return
            body = first.get("body", b"")
            more = first.get("more_body", False)
            info.bytes_in = len(body)
            if more and wants_cache and self.scope_cache:  # the cache key needs the whole body first
                try:
                    body = b"".join([chunk async for chunk in self._stream_body(body, receive, exchange, info)])
                except ClientGone:
                    if exchange.too_large:
                        await send_error(send, self._too_large(), info.error_shape, info.request_id)
                    return
                more = False
            if info.bytes_in > self.max_body:
                await send_error(send, self._too_large(), info.error_shape, info.request_id)
                return
            if self.scope_cache:
                if wants_cache:
                    headers.append(("cf-aig-cache-key", team_cache_key(info, scope, client_cache_key, body, query)))
                elif not skips_cache:  # a gateway-wide cache would key on the shared provider key
                    headers.append(SKIP_CACHE)
            data: bytes | AsyncIterator[bytes] | None
            if more:
                data = self._stream_body(body, receive, exchange, info)
            else:
                data = body or None
                exchange.body_done = True
            await self._exchange(scope, url, headers, data, send, exchange, info)
        except ClientGone:
            return
        except asyncio.CancelledError:
            exchange.task.uncancel()
            if exchange.client_gone:
                info.truncated = info.status != 0
                return
            # cancelled from outside (the server's graceful shutdown ran out) outside the response
            # body, which _exchange handles: one warning line, never a traceback
            log.warning("request_cut_by_shutdown", request_id=info.request_id)
            if info.status == 0:
                closing = ServiceUnavailable("The gateway is shutting down; try again.")
                await send_error(send, closing, info.error_shape, info.request_id)
            else:
                info.truncated = True
                _ENDED_ON_PURPOSE.set(True)
        finally:
            exchange.stop()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body exceeds the gateway's limit of {self.max_body} bytes.")

    async def _stream_body(
        self, first: bytes, receive: Receive, exchange: _Exchange, info: RequestInfo
    ) -> AsyncIterator[bytes]:
        if first:
            yield first
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.client_gone = True
                raise ClientGone
            chunk = message.get("body", b"")
            info.bytes_in += len(chunk)
            if info.bytes_in > self.max_body:
                exchange.too_large = True
                raise ClientGone
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        exchange.body_done = True

    async def _exchange(
        self,
        scope: Scope,
        url: URL,
        headers: list[tuple[str, str]],
        data: bytes | AsyncIterator[bytes] | None,
        send: Send,
        exchange: _Exchange,
        info: RequestInfo,
    ) -> None:
        state = scope["state"]
        session: aiohttp.ClientSession = state["http"]
        metrics: Metrics = state["metrics"]
        error: GatewayError | None = None
        exchange.arm(self.timeout)
        sent_at = time.perf_counter()
        try:
            response = await session.request(scope["method"], url, headers=headers, data=data, allow_redirects=False)
        except asyncio.CancelledError:
            if not exchange.timed_out:
                raise
            exchange.task.uncancel()
            metrics.upstream_error(self.provider.slug, "timeout")
            error = UpstreamTimeout(f"The upstream sent no response within {self.timeout:g} seconds.")
        except ValueError:  # aiohttp refuses a header value (control or non-UTF-8 characters)
            error = BadRequest("A request header has characters that cannot be forwarded.")
        except (aiohttp.ClientError, OSError, ClientGone) as exc:
            if exchange.client_gone:
                return
            if exchange.too_large:
                error = self._too_large()
            else:
                log.warning("upstream_unavailable", request_id=info.request_id, error=type(exc).__name__)
                metrics.upstream_error(self.provider.slug, "unavailable")
                error = UpstreamUnavailable("The upstream refused or dropped the connection before answering.")
        finally:
            exchange.waiting_headers = False
        if error is not None:
            await send_error(send, error, info.error_shape, info.request_id)
            return

        headers_at = time.perf_counter()
        info.upstream_wait = wait = headers_at - sent_at
        gateway = headers_at - info.started - wait
        down = []
        stream = False
        for name, value in response.raw_headers:
            lowered = name.lower()
            if lowered in _DROP_DOWN:
                continue
            if lowered == b"content-type":
                stream = value.startswith(b"text/event-stream")
            down.append((name, value))
        if stream:
            # an event stream is sent chunked, so that one cut short can still end with an error event
            down = [(name, value) for name, value in down if name.lower() != b"content-length"]
            metrics.streams.inc()
        down.append((b"server-timing", b"gateway;dur=%.3f, upstream;dur=%.3f" % (gateway * 1000, wait * 1000)))
        clean = False
        try:
            info.upstream_status = response.status
            await send({"type": "http.response.start", "status": response.status, "headers": down})
            content = response.content
            idle = self.idle_timeout if stream else None
            if idle is not None:
                exchange.watch_idle(idle)
            clock = exchange.loop.time
            chunk = b""
            try:
                while True:
                    if idle is not None:
                        exchange.reading_since = clock()
                    try:
                        chunk = await content.readany()
                    except (aiohttp.ClientError, OSError) as exc:
                        log.warning("upstream_truncated", request_id=info.request_id, error=type(exc).__name__)
                        metrics.upstream_error(self.provider.slug, "truncated")
                        break
                    if idle is not None:
                        exchange.reading_since = NOT_READING
                    last = not chunk or content.at_eof()
                    if last:
                        exchange.finished = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                    if last:
                        clean = True
                        return
            except asyncio.CancelledError:
                if exchange.client_gone:
                    raise
                exchange.task.uncancel()
                if exchange.idled:
                    log.warning("upstream_stream_idle", request_id=info.request_id, idle_seconds=idle)
                    metrics.upstream_error(self.provider.slug, "idle")
                else:  # the server's graceful shutdown ran out
                    log.warning("stream_cut_by_shutdown", request_id=info.request_id)
            exchange.finished = True  # no timer may cancel the ending
            await self._end_cut_short(send, info, stream, chunk)
        finally:
            if stream:
                metrics.streams.dec()
            if clean:
                response.release()
            else:
                response.close()

    async def _end_cut_short(self, send: Send, info: RequestInfo, stream: bool, previous: bytes) -> None:
        """End a response whose body was cut short: an event stream with the provider's error event
        and a proper end, anything else abruptly (the server closes the connection)."""
        info.truncated = True
        if not stream:
            _ENDED_ON_PURPOSE.set(True)
            return
        message = "The upstream stream ended before the response was complete."
        event = error_event(info.error_shape, message, info.request_id, previous)
        await send({"type": "http.response.body", "body": event, "more_body": False})


class _Exchange:
    """Per-request state shared by the relay and its one timer.

    The timer first fires ``WATCH_AFTER_SECONDS`` after the request went upstream: a request that
    is done by then costs one timer handle and nothing else. Otherwise it starts a task that
    watches for the client leaving, then fires again at the header deadline. Both the deadline and
    the watcher cancel the relay's task with a flag set, which the relay turns into a 504 or a
    quiet end.
    """

    __slots__ = (
        "body_done",
        "client_gone",
        "deadline",
        "finished",
        "idle",
        "idle_timer",
        "idled",
        "loop",
        "reading_since",
        "receive",
        "task",
        "timed_out",
        "timer",
        "too_large",
        "waiting_headers",
        "watcher",
    )

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.loop = task.get_loop()
        self.receive = receive
        self.body_done = False
        self.client_gone = False
        self.too_large = False
        self.timed_out = False
        self.finished = False
        self.waiting_headers = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.idle = 0.0
        self.idled = False
        self.reading_since = NOT_READING
        self.idle_timer: asyncio.TimerHandle | None = None

    def arm(self, timeout: float) -> None:
        self.waiting_headers = True
        now = self.loop.time()
        self.deadline = now + timeout
        self.timer = self.loop.call_at(min(self.deadline, now + WATCH_AFTER_SECONDS), self._tick)

    def _tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        if self.waiting_headers and now >= self.deadline and not self.client_gone:
            self.timed_out = True
            self.task.cancel()
            return
        if self.body_done and self.watcher is None:
            self.watcher = self.loop.create_task(self._watch())
        if not self.body_done:
            self.timer = self.loop.call_at(min(self.deadline, now + WATCH_AFTER_SECONDS), self._tick)
        elif self.waiting_headers:
            self.timer = self.loop.call_at(self.deadline, self._tick)

    def watch_idle(self, idle: float) -> None:
        """Cancel the relay (with ``idled`` set) once it has waited ``idle`` seconds for one chunk.

        The relay only stamps ``reading_since`` around each read (``NOT_READING`` while it sends to
        a slow client): the timer checks the stamp when it fires and re-arms itself, so a chunk
        costs no timer work."""
        self.idle = idle
        self.idle_timer = self.loop.call_at(self.loop.time() + idle, self._idle_tick)

    def _idle_tick(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        since = self.reading_since
        if now - since >= self.idle:
            self.idled = True
            self.task.cancel()
            return
        self.idle_timer = self.loop.call_at(min(since, now) + self.idle, self._idle_tick)

    async def _watch(self) -> None:
        message: Message = await self.receive()
        if message["type"] == "http.disconnect" and not self.finished and not self.timed_out:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
