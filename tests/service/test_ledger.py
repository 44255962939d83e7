"""The usage ledger end to end: real SDKs through the gateway, one exact row per request, readable
within seconds; concurrency, a SIGTERM under load and a full queue lose nothing they promise."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest

from providers.prices import load_prices
from service.core.ledger import Ledger, LedgerRow
from service.core.metrics import Metrics
from service.core.store import SQLiteStore
from service.mock_upstream import MOCK_STREAM_USAGE, MockUpstream
from tests.support import ADMIN_KEY, GatewayProcess, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PRICES = load_prices()


def ledger_row(gw: GatewayProcess, request_id: str) -> dict[str, object]:
    """The request's row from ``GET /usage/requests/{id}``, polled: readable within 2 seconds."""
    found: list[dict[str, object]] = []

    def readable() -> bool:
        response = httpx.get(f"{gw.url}/usage/requests/{request_id}", headers=ADMIN)
        if response.status_code == 200:
            found.append(response.json())
        return bool(found)

    wait_until(readable, 2.5, f"the ledger row of {request_id}")
    return found[0]


def usd(micro: int | None) -> float | None:
    return None if micro is None else micro / 1_000_000


def test_each_sdk_call_is_one_exact_row_and_the_totals_add_up(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    gw = make_gateway()
    key = gw.create_key("team_ledger")
    client = openai.OpenAI(api_key=key, base_url=f"{gw.url}/openai/v1", max_retries=0)
    plain = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "mine-1"}
    )
    streamed = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert all(chunk.usage is None for chunk in streamed.parse())
    claude = anthropic.Anthropic(api_key=key, base_url=f"{gw.url}/anthropic", max_retries=0)
    message = claude.messages.with_raw_response.create(
        model="claude-mock-1", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )

    first = ledger_row(gw, plain.headers["x-gateway-request-id"])
    assert first["clientRequestId"] == "mine-1" and first["teamId"] == "team_ledger"
    assert (first["inputTokens"], first["outputTokens"], first["model"]) == (5, 6, "gpt-4o-mini")
    assert first["costUsd"] == usd(PRICES.cost_micro_usd("openai", "gpt-4o-mini", 5, 6))
    assert first["complete"] is True and first["status"] == 200
    second = ledger_row(gw, streamed.headers["x-gateway-request-id"])
    assert (second["inputTokens"], second["outputTokens"]) == (
        MOCK_STREAM_USAGE["prompt_tokens"],
        MOCK_STREAM_USAGE["completion_tokens"],
    )
    third = ledger_row(gw, message.headers["x-gateway-request-id"])
    assert (third["inputTokens"], third["outputTokens"], third["costUsd"]) == (5, 6, None)  # unpriced: null

    report = httpx.get(f"{gw.url}/usage", params={"groupBy": "provider,model"}, headers=ADMIN).json()
    assert report["totals"]["requests"] == 3
    assert report["totals"]["inputTokens"] == 5 + MOCK_STREAM_USAGE["prompt_tokens"] + 5
    assert report["totals"]["unpricedRequests"] == 1
    by_model = {(r["provider"], r["model"]): r for r in report["rows"]}
    assert by_model[("openai", "gpt-4o-mini")]["requests"] == 2
    assert by_model[("anthropic", "claude-mock-1")]["costUsd"] is None

    # the request id starts with the request's time (ms, 12 hex digits): SQLite's ledger reads time
    # ranges (here by hour, not whole days, so from the ledger rather than the daily totals) by it
    request_id = plain.headers["x-gateway-request-id"]
    at = datetime.datetime.fromisoformat(str(first["at"]).replace("Z", "+00:00"))
    assert re.fullmatch(r"[0-9a-f]{32}", request_id) and first["requestId"] == request_id
    assert int(request_id[:12], 16) == int(at.timestamp()) * 1000 + at.microsecond // 1000
    since = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    hourly = httpx.get(f"{gw.url}/usage", params={"from": since, "groupBy": "hour"}, headers=ADMIN).json()
    assert sum(row["requests"] for row in hourly["rows"]) == 3


def test_a_stream_cut_by_the_upstream_is_recorded_incomplete(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    gw = make_gateway()
    key = gw.create_key("team_cut")
    response = httpx.post(
        f"{gw.url}/openai/v1/chat/completions",
        json={"model": "mock-cut", "stream": True, "messages": []},
        headers={"authorization": f"Bearer {key}"},
    )
    row = ledger_row(gw, response.headers["x-gateway-request-id"])
    assert row["complete"] is False and row["model"] == "gpt-4o-mini" and row["status"] == 200


def test_an_sdk_that_closes_at_done_has_a_complete_stream(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    """The OpenAI SDK closes the connection once it reads ``[DONE]``; an upstream that ends its body
    a moment later (``mock-linger``: half a second) has still given the whole answer."""
    gw = make_gateway()
    key = gw.create_key("team_linger")
    client = openai.OpenAI(api_key=key, base_url=f"{gw.url}/openai/v1", max_retries=0)
    streamed = client.chat.completions.with_raw_response.create(
        model="mock-linger", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert [chunk.choices[0].delta.content for chunk in streamed.parse() if chunk.choices]
    request_id = streamed.headers["x-gateway-request-id"]
    row = ledger_row(gw, request_id)
    assert row["complete"] is True and row["inputTokens"] == MOCK_STREAM_USAGE["prompt_tokens"]
    assert gw.access_line(request_id)["truncated"] is False


async def test_a_thousand_concurrent_requests_make_a_thousand_rows(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    gw = make_gateway()
    key = gw.create_key("team_thousand")
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, pool=None)) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"{gw.url}/openai/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": []},
                    headers={"authorization": f"Bearer {key}"},
                )
                for _ in range(1000)
            )
        )
    assert all(response.status_code == 200 for response in responses)

    def totals() -> dict[str, object]:
        report = httpx.get(f"{gw.url}/usage", params={"teamId": "team_thousand"}, headers=ADMIN).json()
        totals: dict[str, object] = report["totals"]
        return totals

    wait_until(lambda: totals()["requests"] == 1000, 5, "1,000 ledger rows")
    assert totals()["inputTokens"] == 5000 and totals()["outputTokens"] == 6000


def test_sigterm_under_load_loses_no_row(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream, tmp_path: Path
) -> None:
    gw = make_gateway()
    key = gw.create_key("team_sigterm")
    answered: list[str] = []

    async def load() -> None:
        streaming = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as client:

            async def one() -> None:
                try:
                    async with client.stream(
                        "POST",
                        f"{gw.url}/openai/_mock/sse?n=20&interval=0.01",
                        headers={"authorization": f"Bearer {key}"},
                    ) as response:
                        if response.status_code != 200:
                            return
                        streaming.set()
                        await response.aread()
                except httpx.HTTPError:
                    return
                answered.append(response.headers["x-gateway-request-id"])

            tasks = [asyncio.create_task(one()) for _ in range(60)]
            await asyncio.wait_for(streaming.wait(), 30)  # streams under way, however busy the machine
            gw.process.send_signal(signal.SIGTERM)  # a deploy, mid-load
            await asyncio.gather(*tasks)

    asyncio.run(load())
    gw.process.wait(30)
    assert answered
    with sqlite3.connect(tmp_path / "gateway.db") as database:
        stored = {row[0] for row in database.execute("SELECT request_id FROM usage_ledger")}
    assert set(answered) <= stored  # every answered request has its row


async def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ledger.db")
    await store.open()
    try:
        ledger = Ledger(store, max_queue=5)
        started = time.perf_counter()
        for n in range(12):
            ledger.record(
                LedgerRow(f"req-{n}", None, "2026-11-30T10:00:00.000Z", "t", "key_0000000000000000", "openai",
                          "gpt-4o-mini", 200, 1, 1, None, None, None, 1, 1.0, 1.0, True)
            )  # fmt: skip
        assert time.perf_counter() - started < 1  # no await, no wait: a list append
        assert ledger.dropped == 7 and len(ledger.queue) == 5
        metrics = Metrics(tmp_path / "metrics", pid=os.getpid())
        metrics.dropped_probe = lambda: ledger.dropped
        assert b"gateway_usage_rows_dropped_total 7.0" in metrics.exposition()[0]
        await ledger.stop()  # what was queued is written
        assert ledger.written == 5
        written = [await store.usage_request(f"req-{n}") for n in range(12)]
        assert [row is not None for row in written] == [True] * 5 + [False] * 7
    finally:
        await store.close()


def _row(request_id: str) -> LedgerRow:
    return LedgerRow(request_id, None, "2026-11-30T10:00:00.000Z", "t", "key_0000000000000000", "openai",
                     "gpt-4o-mini", 200, 1, 1, None, None, None, 1, 1.0, 1.0, True)  # fmt: skip


async def test_a_writer_turn_takes_what_was_queued_when_it_began(tmp_path: Path) -> None:
    """Rows that arrive while a batch is being written go out with the next turn, in one batch,
    not behind each write in batches of one or two (each batch is a transaction); a clean stop
    writes everything, rows that arrive while it writes included."""
    batches: list[int] = []

    class WatchedStore(SQLiteStore):
        async def record_usage(self, rows: Sequence[LedgerRow]) -> None:
            batches.append(len(rows))
            if len(batches) == 1:
                for n in range(3):  # requests ending while the first batch is written
                    ledger.record(_row(f"during-{n}"))
            elif len(batches) == 2:  # one ending while the stop writes (cancelled at shutdown)
                ledger.record(_row("during-stop"))
            await super().record_usage(rows)

    store = WatchedStore(tmp_path / "ledger.db")
    await store.open()
    try:
        ledger = Ledger(store)
        for n in range(5):
            ledger.record(_row(f"req-{n}"))
        await ledger.flush(len(ledger.queue))  # one turn of the writer
        assert batches == [5]
        assert [row.request_id for row in ledger.queue] == ["during-0", "during-1", "during-2"]
        await ledger.stop()  # a clean stop writes the rest, and what arrives while it writes
        assert batches == [5, 3, 1] and ledger.written == 9 and not ledger.queue
        assert await store.usage_request("during-2") is not None
        assert await store.usage_request("during-stop") is not None
    finally:
        await store.close()


async def test_a_row_the_store_refuses_is_dropped_alone_and_the_writer_goes_on(tmp_path: Path) -> None:
    """A batch the store refuses for what it holds (here a figure beyond SQLite's 64-bit integers)
    is written row by row: the bad row is dropped and counted, its neighbours are written, and
    the writer's next turns and a clean stop go on as usual."""
    store = SQLiteStore(tmp_path / "ledger.db")
    await store.open()
    try:
        ledger = Ledger(store, flush_seconds=0.05)
        await ledger.start()
        ledger.record(_row("before"))
        ledger.record(_row("bad")._replace(cost_micro_usd=2**70))
        ledger.record(_row("after"))
        for _ in range(100):
            if not ledger.queue:
                break
            await asyncio.sleep(0.02)
        assert ledger.dropped == 1 and ledger.written == 2 and not ledger.queue
        ledger.record(_row("later"))  # the writer is still running
        for _ in range(100):
            if not ledger.queue:
                break
            await asyncio.sleep(0.02)
        assert ledger.written == 3
        ledger.record(_row("at-stop"))
        await ledger.stop()
        found = {n: await store.usage_request(n) is not None for n in ("before", "bad", "after", "later", "at-stop")}
        assert found == {"before": True, "bad": False, "after": True, "later": True, "at-stop": True}
    finally:
        await store.close()


@pytest.mark.parametrize("metering", ["false"])
def test_no_ledger_without_metering(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream, metering: str
) -> None:
    gw = make_gateway(USAGE_METERING=metering)
    key = gw.create_key("team_unmetered")
    response = httpx.post(
        f"{gw.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    time.sleep(1.5)  # what is checked is that nothing comes: a wait is the behaviour under test
    assert (
        httpx.get(f"{gw.url}/usage/requests/{response.headers['x-gateway-request-id']}", headers=ADMIN).status_code
        == 404
    )
    assert orjson.loads(httpx.get(f"{gw.url}/usage", headers=ADMIN).content)["totals"]["requests"] == 0
