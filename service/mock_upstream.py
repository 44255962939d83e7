"""A fake Cloudflare AI Gateway for tests, demos and benchmarks: a real aiohttp server.

It serves Cloudflare's provider paths (any ``…/chat/completions`` in OpenAI's shape, ``…/responses``,
``/anthropic/v1/messages``, ``/workers-ai/@cf/…``, Gemini's ``…:generateContent``, Cohere's
``/cohere/v2/chat``, ``…/models``), plain and streaming (``"stream": true``), and records what it
received (method, path, query, headers, body digest) so a test can check what reached the
upstream. With ``token`` set it refuses calls without ``cf-aig-authorization: Bearer {token}``, as
an authenticated Cloudflare gateway does.

Test behaviours live under ``/{provider}/_mock/…``: ``echo``, ``bytes?n=``, ``gzip``,
``sse?n=&interval=``, ``status/{code}`` (an error with ``retry-after`` and the upstream's own
``x-ratelimit-*``), ``slow-headers?seconds=``, ``reset`` (before answering),
``die`` (mid-stream) and ``hang`` (one event, then a minute of silence), both with
``?content_type=`` for a body other than an event stream.

SDK calls pick a behaviour by model name instead, for OpenAI chat completions and Anthropic messages
streamed (``"stream": true``): ``mock-cut`` sends two content events, then resets the connection;
``mock-stall`` sends one, then sends nothing more for a minute; ``mock-linger`` sends every event,
then waits half a second before it ends the body (as an upstream may, after ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MAX_KEPT_BODY = 1024 * 1024
RECENT = 50


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    body: bytes | None

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body or b"null")


@dataclass
class MockUpstream:
    token: str | None = None
    record_requests: bool = True
    """Keep every request in ``received`` (tests); off for long runs such as benchmarks."""
    received: list[Received] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    show: bool = False
    """Print one line per request received (``gateway mock-upstream --show``)."""
    recent: deque[Received] = field(default_factory=lambda: deque(maxlen=RECENT))
    """The last requests, for ``GET /__requests`` (kept even when ``record_requests`` is off)."""
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last(self) -> Received:
        return self.received[-1]

    # -- server lifecycle -------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start_in_thread(self) -> None:
        """Serve from a thread of its own, for synchronous tests and scripts."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, name="mock-upstream", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("mock upstream did not start")

    # -- handlers ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        kept = bytearray()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
            if length <= MAX_KEPT_BODY:
                kept += chunk
        record = Received(
            method=request.method,
            path=request.raw_path.split("?", 1)[0],
            query=request.raw_path.partition("?")[2],
            headers=list(request.headers.items()),
            body_length=length,
            body_sha256=digest.hexdigest(),
            body=bytes(kept) if length <= MAX_KEPT_BODY else None,
        )
        if request.path == "/__requests":
            return _json([_shown(r) for r in self.recent])
        self.recent.append(record)
        if self.record_requests:
            self.received.append(record)
        if self.show:
            print(orjson.dumps(_shown(record)).decode(), flush=True)
        if self.token is not None and request.headers.get("cf-aig-authorization") != f"Bearer {self.token}":
            return web.json_response(
                {
                    "success": False,
                    "result": [],
                    "messages": [],
                    "error": [{"code": 2009, "message": "Unauthorized"}],
                },
                status=401,
            )
        path = record.path
        if "/_mock/" in path:
            return await self._behaviour(request, record, path.split("/_mock/", 1)[1])
        body = _json_or_none(record.body)
        stream = isinstance(body, dict) and body.get("stream") is True
        if path.endswith("/chat/completions"):
            return await (self._openai_stream(request, body) if stream else _openai_completion(body))
        if path.endswith("/v1/messages"):
            return await (self._anthropic_stream(request, body) if stream else _anthropic_message(body))
        if path.endswith("/responses") and record.method == "POST":
            return _json(_openai_response(body))
        if "/@cf/" in path:
            return _json(
                {
                    "result": {"response": "Hello from Workers AI"},
                    "success": True,
                    "errors": [],
                    "messages": [],
                }
            )
        if path.endswith(":generateContent") or path.endswith(":streamGenerateContent"):
            return _json(
                {
                    "candidates": [
                        {
                            "content": {"parts": [{"text": "Hello from the mock upstream"}], "role": "model"},
                            "finishReason": "STOP",
                            "index": 0,
                        }
                    ],
                    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 6, "totalTokenCount": 11},
                }
            )
        if path.endswith("/chat") and path.startswith("/cohere/"):
            return _json(
                {
                    "id": "cohere-mock",
                    "finish_reason": "COMPLETE",
                    "message": {
                        "role": "assistant",
                        "content": [{"type": "text", "text": "Hello from the mock upstream"}],
                    },
                    "usage": {"tokens": {"input_tokens": 5, "output_tokens": 6}},
                }
            )
        if path.endswith("/models"):
            return _json(
                {
                    "object": "list",
                    "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "openai"}],
                }
            )
        return _json({"method": record.method, "path": path, "query": record.query})

    async def _behaviour(self, request: web.Request, record: Received, name: str) -> web.StreamResponse:
        query = request.query
        if name == "echo":
            return web.Response(body=record.body or b"", content_type="application/octet-stream")
        if name == "bytes":
            return await _bytes(request, int(query.get("n", "1024")))
        if name == "gzip":
            payload = gzip.compress(b'{"message": "' + b"compressed " * 100 + b'"}', mtime=0)
            return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if name == "sse":
            return await _sse(request, int(query.get("n", "100")), float(query.get("interval", "0")))
        if name.startswith("status/"):
            status = int(name.split("/", 1)[1])
            return web.json_response(
                {"error": {"message": f"upstream says {status}", "type": "rate_limit_error"}},
                status=status,
                headers={
                    "Retry-After": "7",
                    "x-request-id": "req_upstream_error",
                    "X-RateLimit-Limit-Requests": "10000",
                    "X-RateLimit-Remaining-Requests": "0",
                    "X-RateLimit-Limit-Tokens": "30000",
                },
            )
        if name == "slow-headers":
            try:
                await asyncio.sleep(float(query.get("seconds", "5")))
            except asyncio.CancelledError:
                self.events.append(f"slow-headers-cancelled:{time.monotonic()}")
                raise
            return _json({"slow": True})
        if name == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if name == "die":
            content_type = query.get("content_type", "text/event-stream")
            response = web.StreamResponse(headers={"Content-Type": content_type})
            response.content_length = 1_000_000
            await response.prepare(request)
            await response.write(b'data: {"partial": true}\n\n')
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        if name == "hang":
            response = web.StreamResponse(headers={"Content-Type": query.get("content_type", "text/event-stream")})
            await response.prepare(request)
            await response.write(b'data: {"first": true}\n\n')
            await self._stall()
            return response
        return _json({"error": f"unknown mock behaviour {name!r}"}, status=404)

    async def _stall(self) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.events.append(f"hang-cancelled:{time.monotonic()}")
            raise

    async def _stream_events(
        self, request: web.Request, body: Any, events: list[bytes], headers: dict[str, str]
    ) -> web.StreamResponse:
        """Write ``events``, or, for the models ``mock-cut`` and ``mock-stall``, the first few then
        reset the connection or stall; for ``mock-linger``, all of them, then half a second before
        the end of the body."""
        model = body.get("model") if isinstance(body, dict) else None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)
        if model == "mock-cut":
            for event in events[:4]:
                await response.write(event)
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        if model == "mock-stall":
            for event in events[:3]:
                await response.write(event)
            await self._stall()
        for event in events:
            await response.write(event)
        if model == "mock-linger":
            await asyncio.sleep(0.5)
        await response.write_eof()
        return response

    async def _openai_stream(self, request: web.Request, body: Any) -> web.StreamResponse:
        options = body.get("stream_options") if isinstance(body, dict) else None
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = _openai_events(include_usage)
        return await self._stream_events(request, body, events, {"x-request-id": "req_upstream_123"})

    async def _anthropic_stream(self, request: web.Request, body: Any) -> web.StreamResponse:
        return await self._stream_events(request, body, _anthropic_events(), {"request-id": "req_upstream_123"})


_CREDENTIALS = frozenset({"authorization", "cf-aig-authorization", "x-api-key", "api-key", "x-goog-api-key"})


def _shown(record: Received) -> dict[str, object]:
    """What a person may see of a request: credentials as their first characters only."""
    headers = {str(k): (v[:12] + "…" if k.lower() in _CREDENTIALS and len(v) > 12 else v) for k, v in record.headers}
    return {
        "method": record.method,
        "path": record.path,
        "query": record.query,
        "headers": headers,
        "body_length": record.body_length,
    }


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"x-request-id": "req_upstream_123"},
    )


def _json_or_none(body: bytes | None) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


async def _openai_completion(body: Any) -> web.Response:
    model = body.get("model", "gpt-4o-mini") if isinstance(body, dict) else "gpt-4o-mini"
    return _json(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the mock upstream"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        }
    )


MOCK_STREAM_USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _openai_response(body: Any) -> dict[str, object]:
    """A Responses API answer (``POST …/responses``), not streamed."""
    model = body.get("model", "gpt-4o-mini") if isinstance(body, dict) else "gpt-4o-mini"
    return {
        "id": "resp_mock",
        "object": "response",
        "created_at": 1700000000,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello from the mock upstream", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11},
    }


def _openai_events(include_usage: bool = False) -> list[bytes]:
    """A chat completion stream as OpenAI sends it; with ``stream_options.include_usage`` every
    chunk carries ``"usage": null`` and a last chunk with no choices carries the usage."""
    events = []
    extra: dict[str, object] = {"usage": None} if include_usage else {}
    for index, word in enumerate(["Hello", " from", " the", " mock", " upstream"]):
        chunk = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": word} if index else {"role": "assistant", "content": word},
                    "finish_reason": None,
                }
            ],
            **extra,
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    done = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        **extra,
    }
    events.append(b"data: " + orjson.dumps(done) + b"\n\n")
    if include_usage:
        usage = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": MOCK_STREAM_USAGE,
        }
        events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


async def _anthropic_message(body: Any) -> web.Response:
    model = body.get("model", "claude-mock-1") if isinstance(body, dict) else "claude"
    return _json(
        {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Hello from the mock upstream"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 6},
        }
    )


def _anthropic_events() -> list[bytes]:
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_mock",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-mock-1",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 5, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
        )
        for word in ["Hello", " from", " the", " mock", " upstream"]
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 6},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n" for name, data in events]


async def _sse(request: web.Request, count: int, interval: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index in range(count):
        await response.write(b"data: " + orjson.dumps({"index": index, "t": time.time()}) + b"\n\n")
        if interval:
            await asyncio.sleep(interval)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _bytes(request: web.Request, size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"\0" * 65536
    sent = 0
    while sent < size:
        piece = block if size - sent >= len(block) else block[: size - sent]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


def main(host: str = "127.0.0.1", port: int = 8788, token: str | None = None, show: bool = False) -> None:
    async def serve() -> None:
        upstream = MockUpstream(token=token, record_requests=False, show=show)
        await upstream.start(host, port)
        print(f"mock upstream listening on {upstream.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    import os

    main(port=int(os.environ.get("PORT", "8788")), token=os.environ.get("AI_GATEWAY_TOKEN") or None)
