"""The shared relay: one provider request in, the upstream's answer streamed back unchanged.

Bytes in, bytes out: the request body is streamed up as it arrives (or sent as is when it came in
one piece), the upstream's status, headers and body chunks are passed back as they arrive, never
decompressed, parsed or buffered whole. The upstream response is released here, also when the
client disconnects, which cancels the upstream call at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import structlog
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from config import Settings
from middleware.context import SCOPE_KEY, RequestInfo
from providers.base import Provider
from providers.upstream import Upstream
from service.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
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
        b"cf-aig-authorization",
        b"cf-aig-metadata",
    }
)
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
MAX_CACHED_URLS = 1024
MAX_CACHED_PATH = 512


def _without_connection_options(headers: list[tuple[str, str]], connection: bytes) -> list[tuple[str, str]]:
    """Drop the headers the client's ``Connection`` header names: they are for this hop only."""
    named = {token.strip().lower() for token in connection.decode("latin-1").split(",")}
    named -= {"keep-alive", "close", "upgrade", ""}
    return [(k, v) for k, v in headers if k not in named] if named else headers


def team_cache_key(info: RequestInfo, scope: Scope, client_key: bytes | None, body: bytes) -> str:
    """Cloudflare's cache key for a team: the team and the client's own key, or, without one, the
    team and the request itself (method, path, query, body), so teams never share cached answers."""
    digest = hashlib.sha256(info.team.team_id.encode() + b"\0")
    if client_key is not None:
        digest.update(b"key\0" + client_key)
    else:
        digest.update(
            b"\0".join((b"request", scope["method"].encode(), scope["raw_path"], scope["query_string"], body))
        )
    return digest.hexdigest()


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
        drop = set(_DROP_UP) | {h.encode() for h in provider.team_key_headers}
        if self.scope_cache:
            drop.add(b"cf-aig-cache-key")
        self.drop = frozenset(drop)
        self.timeout = settings.upstream_timeout_seconds
        self.max_body = settings.max_request_bytes
        self._urls: dict[str, URL] = {}

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
        try:
            url = self._url(upstream, scope[REST_KEY], scope["query_string"])
        except BadRequest as error:
            await send_error(send, error, info.error_shape, info.request_id)
            return

        drop = self.drop
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
            if direct and name.startswith(b"cf-aig-"):
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
                    headers.append(("cf-aig-cache-key", team_cache_key(info, scope, client_cache_key, body)))
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
            if not exchange.client_gone:
                raise
            exchange.task.uncancel()
            info.truncated = info.status != 0
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
        down.append((b"server-timing", b"gateway;dur=%.3f, upstream;dur=%.3f" % (gateway * 1000, wait * 1000)))
        if stream:
            metrics.streams.inc()
        clean = False
        try:
            info.upstream_status = response.status
            await send({"type": "http.response.start", "status": response.status, "headers": down})
            content = response.content
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, OSError) as exc:
                    log.warning("upstream_truncated", request_id=info.request_id, error=type(exc).__name__)
                    metrics.upstream_error(self.provider.slug, "truncated")
                    info.truncated = True
                    return  # the server closes the connection: the client sees an abrupt end
                last = not chunk or content.at_eof()
                if last:
                    exchange.finished = True
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    clean = True
                    return
        finally:
            if stream:
                metrics.streams.dec()
            if clean:
                response.release()
            else:
                response.close()


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
        "loop",
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

    async def _watch(self) -> None:
        message: Message = await self.receive()
        if message["type"] == "http.disconnect" and not self.finished and not self.timed_out:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
