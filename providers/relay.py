"""The shared relay: one provider request in, the upstream's answer streamed back unchanged.

Bytes in, bytes out: the request body is streamed up as it arrives (or sent as is when it came in
one piece), the upstream's status, headers and body chunks are passed back as they arrive, never
decompressed, parsed or buffered whole. The upstream response is released here, also when the
client disconnects, which cancels the upstream call at once.

Around it: ``headers`` decides what crosses in headers and query strings, ``cache_scope`` keeps
Cloudflare's cache per team, ``watch`` is the one timer per request (header deadline, disconnect,
idle stream) and ``cuts`` ends a response cut short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import structlog
from starlette.types import Receive, Scope, Send

from config import Settings
from providers import headers as header_policy
from providers import stream_options
from providers.base import Provider
from providers.cache_scope import SKIP_CACHE, team_cache_key
from providers.connections import ConnectionPool, RequestTargetError, Target, target
from providers.cuts import ENDED_ON_PURPOSE, error_event, quiet_cuts_on_uvicorn
from providers.headers import HeaderPolicy, without_credentials
from providers.metering import Pricer, request_model
from providers.prices import PriceTable
from providers.registry import credential_headers
from providers.upstream import Upstream
from providers.usage import Usage, UsageReader, usage_reader
from providers.watch import NOT_READING, Exchange
from service.core.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.core.limits.outcome import with_rate_headers
from service.core.metrics import Metrics
from service.core.request import REST_KEY, SCOPE_KEY, RequestInfo

log = structlog.get_logger("gateway.relay")

MAX_CACHED_URLS = 1024
MAX_CACHED_PATH = 512
MAX_UNPRICED_LOGGED = 1000
MAX_MODEL_CHARS = 256
NOT_RELAYED = frozenset({"CONNECT", "TRACE"})
"""CONNECT would turn the upstream connection into a tunnel; TRACE echoes the request back, the
gateway's own credentials included."""
RELAYED_METHODS = (b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
INJECTED_FORMATS = frozenset({"openai-sse", "workers-ai-sse"})
"""The providers whose chat completions streams are asked for their usage (``USAGE_STREAM_OPTIONS``):
the OpenAI-format ones, and Workers AI, whose ``v1/chat/completions`` is OpenAI's."""
_STREAM_ENDS = (b"[DONE]", b'"message_stop"')
"""What the last event of an OpenAI-format stream (``data: [DONE]``) or an Anthropic one
(``message_stop``) holds: a client that leaves once it has it (the OpenAI SDK closes the connection at
``[DONE]``) had the whole answer, even if the upstream's end of the body had not come yet."""


def ends_stream(sent: bytes) -> bool:
    """Whether ``sent``, the last chunk a client received, ends with a stream's own last event."""
    tail = sent[-48:]
    return any(end in tail for end in _STREAM_ENDS)


"""The ``Allow`` header of the 405 those get (every other method is relayed as it is; these are the
ones the providers' APIs use)."""


class ClientGone(Exception):
    """The client disconnected (or overran the size limit) before the request body was complete."""


class Relay:
    def __init__(
        self, provider: Provider, upstream: Upstream | str, settings: Settings, prices: PriceTable | None = None
    ) -> None:
        self.provider = provider
        self.upstream = upstream if isinstance(upstream, Upstream) else None
        self.unavailable = ServiceUnavailable(upstream) if isinstance(upstream, str) else None
        self.via_gateway = self.upstream is not None and self.upstream.via_gateway
        self.added = [(k.encode(), v.encode()) for k, v in self.upstream.headers] if self.upstream else []
        self.scope_cache = self.via_gateway and settings.cache_scope == "team"
        # every provider's credential headers, not only this one's: a team key put in another
        # provider's header (x-goog-api-key on /openai) must not travel either
        self.policy = HeaderPolicy(
            credential_headers(settings.providers_file) | set(provider.team_key_headers),
            via_gateway=self.via_gateway,
            allowed_cf_aig=settings.cf_aig_allowed_headers,
            team_cache=self.scope_cache,
        )
        self.pricer = Pricer(prices, provider.slug) if prices is not None else None
        """This provider's prices; ``None``: usage is not metered (``USAGE_METERING=off``)."""
        self.inject_usage = (
            prices is not None
            and settings.usage_stream_options == "inject"
            and provider.stream_format in INJECTED_FORMATS
        )
        self.timeout = settings.upstream_timeout_seconds
        self.idle_timeout = settings.stream_idle_timeout_seconds
        self.max_body = settings.max_request_bytes
        self._targets: dict[str, Target] = {}
        self._unpriced: set[str | None] = set()
        """Models already logged as having no price (once each, per worker)."""
        quiet_cuts_on_uvicorn()

    def _target(self, upstream: Upstream, rest: str) -> Target:
        """Where the request goes upstream (before its query), parsed once per path."""
        found = self._targets.get(rest)
        if found is None:
            found = target(upstream.url(rest))
            if len(rest) <= MAX_CACHED_PATH:
                if len(self._targets) >= MAX_CACHED_URLS:
                    self._targets.clear()
                self._targets[rest] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        if scope["method"] in NOT_RELAYED:
            raise MethodNotAllowed(f"{scope['method']} requests are not relayed.", headers=[RELAYED_METHODS])
        upstream = self.upstream
        if upstream is None:
            assert self.unavailable is not None
            raise self.unavailable
        query = scope["query_string"]
        if query:
            query = without_credentials(query)
        try:
            url = self._target(upstream, scope[REST_KEY])
        except RequestTargetError:
            raise BadRequest("The request path has characters that cannot be forwarded.") from None

        outgoing = self.policy.up(scope["headers"])
        headers = outgoing.headers
        headers.extend(self.added)
        if self.via_gateway:
            headers.append((b"cf-aig-metadata", (info.metadata or "").encode()))
        declared_length = outgoing.declared_length
        if declared_length is not None and (not declared_length.isdigit() or int(declared_length) > self.max_body):
            raise self._too_large()

        exchange = Exchange(receive, scope)
        try:
            body = info.body
            if body is None:
                first = await receive()
                if first["type"] == "http.disconnect":
                    return
                body = first.get("body", b"")
                more = first.get("more_body", False)
            else:  # read whole by a hop before (a model allow-list, a budget's estimate)
                more = False
            info.bytes_in = len(body)
            inject = self.inject_usage and stream_options.eligible(scope["method"], scope[REST_KEY])
            # the cache key, and asking a stream for its usage, need the whole body first
            if more and (inject or (outgoing.wants_cache and self.scope_cache)):
                try:
                    body = b"".join([chunk async for chunk in self._stream_body(body, receive, exchange, info)])
                except ClientGone:
                    if exchange.too_large:
                        raise self._too_large() from None
                    return
                more = False
            if info.bytes_in > self.max_body:
                raise self._too_large()
            hide_usage = False
            if inject:
                rewritten = stream_options.with_usage_requested(body)
                if rewritten is not None:  # the connection pool sends its length
                    body, hide_usage = rewritten, True
            if self.scope_cache:
                if outgoing.wants_cache:
                    team_id = info.team.team_id if info.team is not None else ""
                    cache_key = team_cache_key(team_id, scope, outgoing.cache_key, body, query)
                    headers.append((b"cf-aig-cache-key", cache_key.encode()))
                elif not outgoing.skips_cache:  # a gateway-wide cache would key on the shared provider key
                    headers.append(SKIP_CACHE)
            data: bytes | AsyncIterator[bytes] | None
            if more:
                data = self._stream_body(body, receive, exchange, info)
            else:
                data = body or None
                exchange.body_done = True
            await self._exchange(
                scope, url, query, headers, declared_length, data, send, exchange, info, body, hide_usage
            )
        except ClientGone:
            return
        except asyncio.CancelledError:
            exchange.task.uncancel()
            if exchange.client_gone:
                info.truncated = info.status != 0 and not info.complete
                return
            # cancelled from outside (the server's graceful shutdown ran out) outside the response
            # body, which _exchange handles: one warning line, never a traceback
            log.warning("request_cut_by_shutdown", request_id=info.request_id)
            if info.status == 0:
                raise ServiceUnavailable("The gateway is shutting down; try again.") from None
            else:
                info.truncated = True
                ENDED_ON_PURPOSE.set(True)
        finally:
            exchange.stop()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body exceeds the gateway's limit of {self.max_body} bytes.")

    async def _stream_body(
        self, first: bytes, receive: Receive, exchange: Exchange, info: RequestInfo
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
        url: Target,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        declared_length: bytes | None,
        data: bytes | AsyncIterator[bytes] | None,
        send: Send,
        exchange: Exchange,
        info: RequestInfo,
        first_body: bytes,
        hide_usage: bool = False,
    ) -> None:
        state = scope["state"]
        pool: ConnectionPool = state["http"]
        metrics: Metrics = state["metrics"]
        error: GatewayError | None = None
        exchange.arm(self.timeout)
        sent_at = time.perf_counter()
        try:
            response = await pool.request(scope["method"], url, query, headers, data, declared_length)
        except asyncio.CancelledError:
            if not exchange.timed_out:
                raise
            exchange.task.uncancel()
            metrics.upstream_error(self.provider.slug, "timeout")
            error = UpstreamTimeout(f"The upstream sent no response within {self.timeout:g} seconds.")
        except RequestTargetError:
            error = BadRequest("The request's query string has characters that cannot be forwarded.")
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
            raise error

        headers_at = time.perf_counter()
        info.upstream_wait = wait = headers_at - sent_at
        gateway = headers_at - info.started - wait
        down, stream, content_type, content_encoding = header_policy.down(response.raw_headers)
        if info.limit_headers is not None:
            down = with_rate_headers(down, info.limit_headers)
        if stream:
            metrics.streams.inc()
        down.append((b"server-timing", b"gateway;dur=%.3f, upstream;dur=%.3f" % (gateway * 1000, wait * 1000)))
        clean = False
        reader: UsageReader | None = None
        if self.pricer is not None:
            reader = usage_reader(
                self.provider.stream_format,
                scope[REST_KEY],
                response.status,
                content_type.decode("latin-1") if content_type is not None else None,
                content_encoding.decode("latin-1") if content_encoding is not None else None,
            )
        try:
            info.upstream_status = response.status
            await send({"type": "http.response.start", "status": response.status, "headers": down})
            content = response.content
            idle = self.idle_timeout if stream else None
            if idle is not None:
                exchange.watch_idle(idle)
            clock = exchange.loop.time
            chunk = delivered = b""
            hider = stream_options.UsageChunkHider() if hide_usage and stream else None
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
                    sent = chunk if hider is None else hider(chunk, last)
                    await send({"type": "http.response.body", "body": sent, "more_body": not last})
                    delivered = sent
                    if reader is not None:  # after the client has the chunk: metering never delays it
                        reader.feed(chunk)
                    if last:
                        clean = True
                        return
            except asyncio.CancelledError:
                if exchange.client_gone:
                    if stream and ends_stream(delivered):
                        info.complete = True  # it left after the stream's own end: nothing was cut
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
            if reader is not None:
                self._meter(info, reader.result(), scope[REST_KEY], first_body)

    def _meter(self, info: RequestInfo, usage: Usage, rest: str, first_body: bytes) -> None:
        """What the response used and cost, onto the request's info (the ledger row and the access
        line read it there): the model the upstream named, else the one the request named."""
        pricer = self.pricer
        assert pricer is not None
        info.metered = usage.found  # only what was read counts in the token and cost metrics
        model = usage.model or request_model(self.provider.slug, rest, first_body)
        if model is not None and len(model) > MAX_MODEL_CHARS:
            model = model[:MAX_MODEL_CHARS]  # what the upstream names goes into logs, metrics and the ledger
        info.model = model
        info.input_tokens = usage.input_tokens
        info.output_tokens = usage.output_tokens
        info.cache_read_tokens = usage.cache_read_tokens
        info.cache_write_tokens = usage.cache_write_tokens
        info.reasoning_tokens = usage.reasoning_tokens
        if usage.found:
            info.cost_micro_usd = cost = pricer.cost(model, usage)
            if cost is None and model not in self._unpriced and len(self._unpriced) < MAX_UNPRICED_LOGGED:
                self._unpriced.add(model)
                log.warning("model_unpriced", provider=self.provider.slug, model=model, hint="add it with PRICES_FILE")

    async def _end_cut_short(self, send: Send, info: RequestInfo, stream: bool, previous: bytes) -> None:
        """End a response whose body was cut short: an event stream with the provider's error event
        and a proper end, anything else abruptly (the server closes the connection)."""
        info.truncated = True
        if not stream:
            ENDED_ON_PURPOSE.set(True)
            return
        message = "The upstream stream ended before the response was complete."
        event = error_event(info.error_shape, message, info.request_id, previous)
        await send({"type": "http.response.body", "body": event, "more_body": False})
