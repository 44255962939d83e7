"""Streaming pass-through, failure handling and limits, through a running gateway and a real upstream."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import threading
import time

import anthropic
import httpx
import openai
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.support import GATEWAY_TOKEN, GatewayProcess, free_port, raw_request, wait_until


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_relayed(gateway: GatewayProcess, team_key: str, upstream: MockUpstream, method: str) -> None:
    response = httpx.request(method, f"{gateway.url}/anthropic/v1/files/abc", headers={"x-api-key": team_key})
    assert response.status_code == 200
    assert response.json()["method"] == method and response.json()["path"] == "/anthropic/v1/files/abc"


def test_20_mib_request_body_arrives_identical(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    body = os.urandom(20 * 1024 * 1024)
    response = httpx.post(f"{gateway.url}/openai/v1/_mock/echo", content=body, headers=auth(team_key), timeout=60)
    assert response.status_code == 200
    sent = upstream.last()
    assert sent.body_length == len(body) and sent.body_sha256 == hashlib.sha256(body).hexdigest()

    def pieces():  # chunked from the client, streamed up as it arrives
        for start in range(0, len(body), 1024 * 1024):
            yield body[start : start + 1024 * 1024]

    response = httpx.post(f"{gateway.url}/openai/v1/_mock/echo", content=pieces(), headers=auth(team_key), timeout=60)
    assert response.status_code == 200
    assert upstream.last().body_sha256 == hashlib.sha256(body).hexdigest()


def test_gzip_body_keeps_its_bytes_and_encoding(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    with httpx.stream(
        "GET", f"{upstream.url}/openai/_mock/gzip", headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
    ) as r:
        direct = b"".join(r.iter_raw())
    with httpx.stream("GET", f"{gateway.url}/openai/_mock/gzip", headers=auth(team_key)) as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
    assert raw == direct  # the compressed bytes, not decompressed or re-encoded
    assert gzip.decompress(raw).startswith(b'{"message": "compressed')
    assert upstream.last().header("accept-encoding") == response.request.headers["accept-encoding"]


def test_large_response_streams_with_flat_memory(gateway: GatewayProcess, team_key: str) -> None:
    size = 256 * 1024 * 1024
    pid = gateway.process.pid
    baseline = rss_kib(pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)  # the sampling interval, not a wait for anything

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = 0
    try:
        with httpx.stream(
            "GET", f"{gateway.url}/openai/_mock/bytes?n={size}", headers=auth(team_key), timeout=60
        ) as response:
            assert response.headers["content-length"] == str(size)
            for chunk in response.iter_raw(1024 * 1024):
                received += len(chunk)
    finally:
        done.set()
        sampler.join()
    assert received == size
    assert (peak - baseline) < 8 * 1024, f"RSS grew by {(peak - baseline) / 1024:.1f} MiB"


def test_sse_events_reach_the_client_as_they_are_sent(gateway: GatewayProcess, team_key: str) -> None:
    arrivals = []
    with httpx.stream("GET", f"{gateway.url}/openai/_mock/sse?n=5&interval=0.4", headers=auth(team_key)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.time(), orjson.loads(line[6:])["t"]))
    assert len(arrivals) == 5
    # each event arrives when the upstream sent it, not when the upstream finished
    for received_at, sent_at in arrivals:
        assert received_at - sent_at < 0.3
    assert arrivals[-1][0] - arrivals[0][0] > 1.2


def test_client_disconnect_cancels_the_upstream_call(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    before = len(upstream.events)
    with httpx.stream("GET", f"{gateway.url}/openai/_mock/hang", headers=auth(team_key)) as response:
        request_id = response.headers["x-gateway-request-id"]
        first = next(response.iter_lines())
        assert first.startswith("data:")
    wait_until(lambda: len(upstream.events) > before, 5, "the upstream call being cancelled")
    line = gateway.access_line(request_id)
    assert line["truncated"] is True and line["upstream_status"] == 200


def test_a_client_leaving_before_the_answer_starts_cancels_the_upstream_call_at_once(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    before = len(upstream.events)
    headers = {**auth(team_key), "x-request-id": "leaves-early"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{gateway.url}/openai/_mock/slow-headers?seconds=30", headers=headers, timeout=0.5)
    left = time.monotonic()
    wait_until(lambda: len(upstream.events) > before, 5, "the upstream call being cancelled")
    assert upstream.events[-1].startswith("slow-headers-cancelled")
    assert float(upstream.events[-1].split(":")[1]) - left < 1.0

    def access_line() -> dict[str, object] | None:
        return next((e for e in gateway.log_lines() if e.get("client_request_id") == "leaves-early"), None)

    wait_until(lambda: access_line() is not None, 5, "the access line")
    line = access_line()
    assert line is not None and line["status"] == 499 and line["upstream_status"] is None


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
def test_trace_and_connect_are_not_relayed(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, method: str
) -> None:
    before = len(upstream.received)
    response = raw_request(gateway.url, method, "/openai/v1/models", [("authorization", f"Bearer {team_key}")])
    assert response.status == 405
    assert response.json()["error"]["code"] == "method_not_allowed"  # type: ignore[index]
    assert response.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"  # as a 405 must
    assert len(upstream.received) == before


def test_upstream_errors_pass_through_unchanged(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.post(f"{gateway.url}/openai/v1/_mock/status/429", json={}, headers=auth(team_key))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"] == "req_upstream_error"
    assert response.json() == {"error": {"message": "upstream says 429", "type": "rate_limit_error"}}
    assert httpx.get(f"{gateway.url}/anthropic/_mock/status/529", headers=auth(team_key)).status_code == 529


def test_upstream_that_dies_mid_body_ends_the_response_abruptly(gateway: GatewayProcess, team_key: str) -> None:
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "GET", f"{gateway.url}/openai/_mock/die?content_type=application/json", headers=auth(team_key)
        ) as response,
    ):
        request_id = response.headers["x-gateway-request-id"]
        for _ in response.iter_raw():
            pass
    line = gateway.access_line(request_id)
    assert line["truncated"] is True and line["status"] == 200
    cut_lines = [entry for entry in gateway.log_lines() if entry.get("request_id") == request_id]
    assert [(entry["event"], entry["level"]) for entry in cut_lines] == [
        ("upstream_truncated", "warning"),
        ("request", "info"),
    ]
    assert "without completing response" not in gateway.log_text()


def last_event(body: str) -> str:
    return [event for event in body.split("\n\n") if event.strip()][-1]


@pytest.mark.parametrize(
    ("provider", "check"),
    [
        ("openai", lambda event: orjson.loads(event.removeprefix("data: "))["error"]["code"] == "upstream_truncated"),
        (
            "anthropic",
            lambda event: (
                event.startswith("event: error\ndata: ")
                and orjson.loads(event.split("data: ", 1)[1])["error"]["type"] == "api_error"
            ),
        ),
        (
            "google-ai-studio",
            lambda event: orjson.loads(event.removeprefix("data: "))["error"]["status"] == "UNAVAILABLE",
        ),
        ("cohere", lambda event: "ended before" in orjson.loads(event.removeprefix("data: "))["message"]),
        ("workers-ai", lambda event: orjson.loads(event.removeprefix("data: "))["success"] is False),
        ("workers-ai/v1", lambda event: orjson.loads(event.removeprefix("data: "))["error"]["type"] == "api_error"),
    ],
)
def test_an_event_stream_cut_by_the_upstream_ends_with_the_providers_error_event(
    gateway: GatewayProcess, team_key: str, provider: str, check
) -> None:  # type: ignore[no-untyped-def]
    # the upstream declares a length, then resets: the client still gets a well-formed end
    response = httpx.get(f"{gateway.url}/{provider}/_mock/die", headers=auth(team_key))
    assert response.status_code == 200 and "content-length" not in response.headers
    assert response.text.startswith('data: {"partial": true}\n\n')
    assert check(last_event(response.text)), response.text
    request_id = response.headers["x-gateway-request-id"]
    assert response.headers["x-gateway-request-id"] in last_event(response.text)
    assert gateway.access_line(request_id)["truncated"] is True


def test_sdks_raise_on_a_stream_cut_by_the_upstream(gateway: GatewayProcess, team_key: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=team_key, max_retries=0)
    received = []
    with (
        pytest.raises(openai.APIError) as raised,
        client.chat.completions.create(
            model="mock-cut", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream,  # closed on the way out: no connection left for the garbage collector
    ):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello", " from", " the", " mock"]
    assert "ended before" in raised.value.message

    claude = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=team_key, max_retries=0)
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as cut,
        claude.messages.stream(model="mock-cut", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as stream,
    ):
        texts.extend(stream.text_stream)
    assert texts == ["Hello", " from"]
    assert "ended before" in str(cut.value)


def test_stream_idle_timeout_ends_a_silent_stream(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(STREAM_IDLE_TIMEOUT_SECONDS="0.5")
    key = gw.create_key()
    before = len(upstream.events)
    response = httpx.get(f"{gw.url}/openai/_mock/hang", headers=auth(key), timeout=30)
    assert response.text.startswith('data: {"first": true}\n\n')
    assert orjson.loads(last_event(response.text).removeprefix("data: "))["error"]["code"] == "upstream_truncated"
    request_id = response.headers["x-gateway-request-id"]
    assert gw.access_line(request_id)["truncated"] is True
    idle = [line for line in gw.log_lines() if line.get("event") == "upstream_stream_idle"]
    assert [(line["request_id"], line["level"]) for line in idle] == [(request_id, "warning")]
    wait_until(lambda: len(upstream.events) > before, 5, "the upstream call being closed")

    client = openai.OpenAI(base_url=f"{gw.url}/openai/v1", api_key=key, max_retries=0)
    with (
        pytest.raises(openai.APIError),
        client.chat.completions.create(
            model="mock-stall", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stalled,
    ):
        for _ in stalled:
            pass
    # streams that keep talking, however slowly overall, are not cut
    with httpx.stream("GET", f"{gw.url}/openai/_mock/sse?n=4&interval=0.3", headers=auth(key)) as stream:
        assert sum(1 for line in stream.iter_lines() if line.startswith("data: {")) == 4
    assert not [line for line in gw.log_lines() if line.get("level") == "error"]


def test_refused_upstream_is_502_shaped_with_request_id(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    key = gw.create_key()
    response = httpx.post(f"{gw.url}/openai/v1/chat/completions", json={}, headers=auth(key))
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert response.headers["x-gateway-request-id"] in response.json()["error"]["message"]
    response = httpx.post(f"{gw.url}/anthropic/v1/messages", json={}, headers={"x-api-key": key})
    assert response.status_code == 502 and response.json()["type"] == "error"


def test_slow_upstream_headers_are_504(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(UPSTREAM_TIMEOUT_SECONDS="0.5")
    key = gw.create_key()
    response = httpx.get(f"{gw.url}/openai/_mock/slow-headers?seconds=3", headers=auth(key))
    assert response.status_code == 504
    assert response.headers["x-gateway-request-id"] in response.json()["error"]["message"]
    # a stream slower than the timeout between events is not cut: the timeout covers headers only
    with httpx.stream("GET", f"{gw.url}/openai/_mock/sse?n=3&interval=0.7", headers=auth(key)) as stream:
        assert sum(1 for line in stream.iter_lines() if line.startswith("data: {")) == 3


def test_body_over_max_request_bytes_is_413(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(MAX_REQUEST_BYTES="1000")
    key = gw.create_key()
    before = len(upstream.received)
    response = httpx.post(f"{gw.url}/openai/v1/chat/completions", content=b"x" * 1001, headers=auth(key))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def pieces():
        for _ in range(4):
            yield b"x" * 400

    response = httpx.post(f"{gw.url}/anthropic/v1/messages", content=pieces(), headers={"x-api-key": key})
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
    assert httpx.post(f"{gw.url}/openai/v1/chat/completions", content=b"x" * 1000, headers=auth(key)).status_code == 200
    # whatever reached the upstream (the last one the request at the limit) carried no more than the limit
    lengths = [r.body_length for r in upstream.received[before:]]
    assert lengths and lengths[-1] == 1000
    assert all(length <= 1000 for length in lengths)


def test_without_ai_gateway_url_provider_routes_are_503(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(upstream_url=None)
    key = gw.create_key()
    response = httpx.post(f"{gw.url}/openai/v1/chat/completions", json={}, headers=auth(key))
    assert response.status_code == 503
    assert "AI_GATEWAY_URL" in response.json()["error"]["message"]
    assert any(line.get("event") == "ai_gateway_url_unset" and line["level"] == "warning" for line in gw.log_lines())


@pytest.mark.parametrize(
    "target",
    [
        "/openai/../tokens",
        "/openai/v1/../../x",
        "/openai/%2e%2e/x",
        "/openai/%2E%2E",
        "/openai/v1%2f..%2fx",
        "/openai/./chat",
        "/anthropic/v1/%5c..%5cx",
        "/workers-ai/a/%00",
        "/openai/..%2f..%2fsecret",
    ],
)
def test_paths_cannot_leave_the_provider_base(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, target: str
) -> None:
    before = len(upstream.received)
    response = raw_request(gateway.url, "GET", target, auth(team_key).items())
    assert response.status in (400, 404), response.body
    assert len(upstream.received) == before
    # a request inside the base still goes up, so the record is live and the probe really sent nothing
    assert raw_request(gateway.url, "GET", "/openai/v1/models", auth(team_key).items()).status == 200
    sent = upstream.received[before:]
    assert [r.path for r in sent] == ["/openai/models"]
    assert all(r.path.startswith(("/openai/", "/anthropic/", "/workers-ai/")) and ".." not in r.path for r in sent)


def test_empty_segments_are_collapsed_inside_the_base(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    response = raw_request(gateway.url, "POST", "/openai//v1//chat///completions", auth(team_key).items())
    assert response.status == 200
    assert upstream.last().path == "/openai/chat/completions"
    response = raw_request(gateway.url, "GET", "/workers-ai/@cf/meta/llama%203", auth(team_key).items())
    assert response.status == 200
    assert upstream.last().path == "/workers-ai/@cf/meta/llama%203"


def test_request_ids(gateway: GatewayProcess, team_key: str) -> None:
    fresh = httpx.get(f"{gateway.url}/openai/models", headers=auth(team_key))
    assert len(fresh.headers["x-gateway-request-id"]) >= 16
    insane = httpx.get(f"{gateway.url}/openai/models", headers={**auth(team_key), "x-request-id": "a b<script>"})
    assert insane.headers["x-gateway-request-id"] != "a b<script>"
    assert httpx.get(f"{gateway.url}/nope").headers["x-gateway-request-id"]


async def test_requests_side_by_side_each_get_their_own_answer_whole(gateway: GatewayProcess, team_key: str) -> None:
    """While other requests run, writes wait for the loop turn's end and leave together: 60 keep-alive
    clients side by side, each sending bodies of its own (small, around the size written at once, and
    large) in turn, each get back their own body, byte for byte; 60 streams side by side, their events
    sent back to back, each get every event in order."""
    sizes = (1, 300, 16 * 1024 - 1, 16 * 1024, 200_000)
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(index: int) -> list[bool]:
            same = []
            for size in sizes:
                body = os.urandom(size)
                response = await client.post(
                    f"{gateway.url}/openai/v1/_mock/echo?client={index}", content=body, headers=auth(team_key)
                )
                same.append(response.status_code == 200 and response.content == body)
            return same

        async def stream() -> list[int]:
            # events sent back to back: several reach the relay in one loop turn and leave in one write
            async with client.stream(
                "GET", f"{gateway.url}/openai/_mock/sse?n=200&interval=0", headers=auth(team_key)
            ) as response:
                text = (await response.aread()).decode()
            return [orjson.loads(line[6:])["index"] for line in text.splitlines() if line.startswith('data: {"')]

        results = await asyncio.gather(*(one(index) for index in range(60)))
        streams = await asyncio.gather(*(stream() for _ in range(60)))
    assert results == [[True] * len(sizes)] * 60
    assert streams == [list(range(200))] * 60


async def test_200_concurrent_streams(gateway: GatewayProcess, team_key: str) -> None:
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> int:
            events = 0
            async with client.stream(
                "GET", f"{gateway.url}/openai/_mock/sse?n=20&interval=0.02", headers=auth(team_key)
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    events += line.startswith("data: ")
            return events

        results = await asyncio.gather(*(one() for _ in range(200)))
    assert results == [21] * 200
