"""Limits across processes: two gateway processes on one Redis (and one database), the real
OpenAI and Anthropic SDKs, the mock upstream answering every request with the same usage.

``budget-model`` costs nothing per input token and $1 per million output tokens (1 micro-dollar per
token): a request with ``max_tokens=6`` reserves exactly 6 micro-dollars and, answered with the mock's
6 output tokens, costs exactly that, so how many requests a budget has room for is known exactly.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from service.core.ledger import LedgerRow
from service.core.store import SQLiteStore
from service.core.store.base import utc_timestamp
from service.mock_upstream import MockUpstream
from tests.redis_server import REDIS_URL, PrivateRedis
from tests.support import ADMIN_KEY, BIN, GatewayProcess, free_port, gateway_env, launch, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PRICES = """
[openai."budget-model"]
input = 0
output = 1.0

[anthropic."budget-claude"]
input = 0
output = 1.0
"""
MESSAGES = [{"role": "user", "content": "Hi"}]


def limited(make_gateway: Callable[..., GatewayProcess], tmp_path: Path, redis_url: str, **env: str) -> GatewayProcess:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    return make_gateway(REDIS_URL=redis_url, PRICES_FILE=str(prices), **env)


@pytest.fixture
def pair(make_gateway: Callable[..., GatewayProcess], tmp_path: Path, redis_prefix: str) -> list[GatewayProcess]:
    """Two gateway processes sharing one Redis (the test's own prefix) and one database; leases live
    2 seconds unless renewed (renewed every 2/3 s while their request runs)."""
    env = {"REDIS_KEY_PREFIX": redis_prefix, "UPSTREAM_TIMEOUT_SECONDS": "1", "LIMITS_LEASE_SECONDS": "2"}
    return [limited(make_gateway, tmp_path, REDIS_URL, **env) for _ in range(2)]


def set_limits(gateway: GatewayProcess, path: str, **limits: object) -> dict[str, object]:
    response = httpx.patch(f"{gateway.url}{path}", json={"limits": limits}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def state(gateway: GatewayProcess, team_id: str) -> dict[str, object]:
    response = httpx.get(f"{gateway.url}/teams/{team_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    found: dict[str, object] = response.json()["state"]
    return found


def wait_for_state(gateway: GatewayProcess, team_id: str, timeout: float = 10, **expected: object) -> None:
    wait_until(
        lambda: all(state(gateway, team_id)[name] == value for name, value in expected.items()),
        timeout,
        f"{team_id}'s state {expected} (now {state(gateway, team_id)})",
    )


def clients(gateways: list[GatewayProcess], key: str) -> list[openai.AsyncOpenAI]:
    return [openai.AsyncOpenAI(base_url=f"{g.url}/openai/v1", api_key=key, max_retries=0) for g in gateways]


async def test_fifty_concurrent_requests_against_a_budget_with_room_for_ten(pair: list[GatewayProcess]) -> None:
    a, b = pair
    set_limits(a, "/teams/team_budget", budgetUsd=0.00006, budgetPeriod="day")  # room for 10 requests of 6
    key = a.create_key("team_budget")
    sdks = clients(pair, key)

    async def one(n: int) -> str:
        try:
            await sdks[n % 2].chat.completions.create(model="budget-model", max_tokens=6, messages=MESSAGES)
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) >= 1
            assert "team 'team_budget' budget ($0.000060 per day" in exc.message
            return "refused"
        return "ok"

    results = await asyncio.gather(*(one(n) for n in range(50)))
    assert results.count("ok") == 10
    assert results.count("refused") == 40
    wait_for_state(b, "team_budget", spentUsd=0.00006, reservedUsd=0.0, inFlight=0, remainingUsd=0.0)
    with pytest.raises(openai.RateLimitError):
        await sdks[1].chat.completions.create(model="budget-model", max_tokens=1, messages=MESSAGES)
    for sdk in sdks:
        await sdk.close()


async def test_requests_per_minute_are_exact_across_processes(pair: list[GatewayProcess]) -> None:
    a, b = pair
    set_limits(b, "/teams/team_rpm", requestsPerMinute=6, tokensPerMinute=100_000)
    key = a.create_key("team_rpm")
    sdks = clients(pair, key)
    remaining = []
    for n in range(6):
        raw = await sdks[n % 2].chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "6"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [5, 4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as refused:
        await sdks[1].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "team 'team_rpm' requests per minute (6)" in refused.value.message
    headers = refused.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60
    claude = anthropic.AsyncAnthropic(base_url=f"{a.url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        await claude.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
    # tokens per minute are the upstream's own counts (5 in, 6 out per answer), not the estimates
    wait_for_state(a, "team_rpm", tokensThisMinute=6 * 11, requestsThisMinute=6, inFlight=0)
    for sdk in sdks:
        await sdk.close()
    await claude.close()


async def spend(gateway: GatewayProcess, team_id: str, key_id: str, micro_usd: int) -> None:
    """A ledger row of ``micro_usd`` for the team, written through the store as the gateway writes them."""
    store = SQLiteStore(Path(gateway.env["DATABASE_URL"].removeprefix("sqlite:///")))
    await store.open()
    row = LedgerRow(
        request_id=f"earlier-{team_id}",
        client_request_id=None,
        at=utc_timestamp(),
        team_id=team_id,
        key_id=key_id,
        provider="openai",
        model="budget-model",
        status=200,
        input_tokens=0,
        output_tokens=micro_usd,
        cache_read_tokens=None,
        cache_write_tokens=None,
        reasoning_tokens=None,
        cost_micro_usd=micro_usd,
        duration_ms=1.0,
        ttfb_ms=1.0,
        complete=True,
    )
    try:
        await store.record_usage([row])
    finally:
        await store.close()


def test_a_thousand_cut_short_requests_leave_nothing_held(pair: list[GatewayProcess]) -> None:
    """Streams cancelled by their clients at random points, upstream errors, upstream timeouts,
    clients leaving before any answer, the gateway's own refusals after admission: afterwards
    nothing is reserved or in flight, and a team at 10% of its budget was never refused (each
    request reserves 1% of it: leaks would show at once).
    The concurrency limit is twice the clients' own: a lease ends a moment after its client left."""
    a, b = pair
    key = a.create_key("team_storm")
    key_id = httpx.get(f"{a.url}/tokens?teamId=team_storm", headers=ADMIN).json()["tokens"][0]["keyId"]
    asyncio.run(spend(a, "team_storm", key_id, 100_000))  # 10% of the budget, in the ledger
    set_limits(a, "/teams/team_storm", budgetUsd=1, budgetPeriod="total", maxConcurrent=100)
    wait_for_state(a, "team_storm", spentUsd=0.1)
    body = {"model": "budget-model", "max_tokens": 10_000, "stream": True, "messages": MESSAGES}  # reserves 1%
    rng = random.Random(12)
    outcomes: dict[str, int] = {}
    limit = asyncio.Semaphore(50)

    async def one(n: int, http: httpx.AsyncClient) -> None:
        base = pair[n % 2].url + "/openai"
        kind = rng.choice(["cut", "cut", "cut", "error", "reset", "timeout", "gone", "own", "whole"])
        async with limit:
            try:
                if kind == "cut":  # a long stream the client leaves after a few events
                    async with http.stream("POST", f"{base}/_mock/sse?n=40&interval=0.01", json=body) as response:
                        assert response.status_code == 200
                        wanted = rng.randint(0, 10)
                        async for _ in response.aiter_bytes():
                            wanted -= 1
                            if wanted <= 0:
                                break
                elif kind == "gone":  # the client leaves before the answer
                    with pytest.raises(httpx.TimeoutException):
                        await http.post(f"{base}/_mock/slow-headers?seconds=2", json=body, timeout=0.1)
                elif kind == "own":  # admitted, then refused by the relay (a method it never forwards)
                    response = await http.request("TRACE", f"{base}/v1/chat/completions", json=body)
                    assert response.status_code == 405, response.text
                else:
                    path = {
                        "error": "_mock/status/500",
                        "reset": "_mock/reset",
                        "timeout": "_mock/slow-headers?seconds=3",
                        "whole": "v1/chat/completions",
                    }[kind]
                    response = await http.post(f"{base}/{path}", json={**body, "stream": False})
                    assert response.status_code in {200, 500, 502, 504}, response.text
            except httpx.ReadError:
                pass  # the upstream reset the stream: the gateway ended it cut short
            outcomes[kind] = outcomes.get(kind, 0) + 1

    async def run() -> None:
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=30, limits=httpx.Limits(max_connections=100)) as http:
            await asyncio.gather(*(one(n, http) for n in range(1000)))

    asyncio.run(run())
    assert sum(outcomes.values()) == 1000 and len(outcomes) == 7
    for gateway in pair:
        wait_for_state(gateway, "team_storm", reservedUsd=0.0, inFlight=0)
    refused = [line for g in pair for line in g.log_lines() if line.get("status") == 429]
    assert refused == []
    spent = state(b, "team_storm")["spentUsd"]
    assert isinstance(spent, float) and 0.1 < spent < 0.11  # the answered requests' 6 micro-dollars each


def test_a_killed_process_frees_its_leases(pair: list[GatewayProcess]) -> None:
    a, b = pair
    set_limits(a, "/teams/team_killed", maxConcurrent=1, budgetUsd=0.00001, budgetPeriod="day")
    key = a.create_key("team_killed")
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "budget-model", "max_tokens": 10, "stream": True, "messages": MESSAGES}
    with httpx.stream("POST", f"{a.url}/openai/_mock/hang", json=body, headers=headers, timeout=30) as hanging:
        assert hanging.status_code == 200
        chunks = hanging.iter_bytes()  # kept: a generator collected would close the stream
        next(chunks)  # mid-stream
        wait_for_state(b, "team_killed", inFlight=1, reservedUsd=0.00001)
        time.sleep(3)  # longer than a lease: the running process keeps renewing it
        assert state(b, "team_killed")["inFlight"] == 1
        refused = httpx.post(f"{b.url}/openai/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 429
        a.process.kill()  # SIGKILL: no release, no renewal
        a.process.wait()
    wait_for_state(b, "team_killed", timeout=15, inFlight=0, reservedUsd=0.0)
    answered = httpx.post(f"{b.url}/openai/v1/chat/completions", json={**body, "stream": False}, headers=headers)
    assert answered.status_code == 200


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_redis_stopped_and_restarted_mid_run(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, private_redis: PrivateRedis, fail_mode: str
) -> None:
    gateway = limited(make_gateway, tmp_path, private_redis.url, LIMITS_FAIL_MODE=fail_mode)
    set_limits(gateway, "/teams/team_outage", requestsPerMinute=100, budgetUsd=1, budgetPeriod="month")
    key = gateway.create_key("team_outage")
    free = gateway.create_key("team_free")
    sdk = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    answered = 0

    def call() -> httpx.Headers:
        nonlocal answered
        raw = sdk.chat.completions.with_raw_response.create(model="budget-model", max_tokens=6, messages=MESSAGES)
        answered += 1
        return raw.headers

    assert "x-ratelimit-remaining-requests" in call()
    private_redis.stop()
    for _ in range(3):
        if fail_mode == "open":
            assert "x-ratelimit-remaining-requests" not in call()  # admitted unchecked
        else:
            with pytest.raises(openai.InternalServerError) as unavailable:
                call()
            assert unavailable.value.status_code == 503
            assert "Limits cannot be checked" in unavailable.value.message
    unlimited = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=free, max_retries=0)
    unlimited.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # no limits: Redis not needed
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "degraded", "store": "ok", "limits": "unreachable"}
    wait_until(lambda: "gateway_limits_degraded 1.0" in metrics(gateway), 5)
    assert [line["event"] for line in gateway.log_lines()].count("limits_unavailable") == 1

    private_redis.start()  # empty, as a Redis without a disk comes back
    wait_until(lambda: httpx.get(f"{gateway.url}/readyz").json()["status"] == "ready", 10, "recovery")
    headers = call()
    assert headers["x-ratelimit-remaining-requests"] == "99"  # counting again, from an empty Redis
    wait_until(lambda: "gateway_limits_degraded 0.0" in metrics(gateway), 5)
    assert any(line["event"] == "limits_recovered" for line in gateway.log_lines())
    # the spent amount is the ledger's: every request answered, during the outage too
    wait_for_state(gateway, "team_outage", spentUsd=answered * 6 / 1_000_000)
    sdk.close()
    unlimited.close()


def metrics(gateway: GatewayProcess) -> str:
    return httpx.get(f"{gateway.url}/metrics", headers=ADMIN).text


def test_several_workers_without_redis_refuse_limits(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, upstream: MockUpstream
) -> None:
    gateway = make_gateway(workers=2)
    refused = httpx.patch(f"{gateway.url}/teams/team_x", json={"limits": {"maxConcurrent": 5}}, headers=ADMIN)
    assert refused.status_code == 409
    assert "REDIS_URL" in refused.json()["error"]
    gateway.stop()
    env = gateway_env(upstream.url, tmp_path)
    cli = [str(BIN / "gateway"), "teams", "set-limits", "team_x", "--max-concurrent", "5"]
    subprocess.run(cli, env=env, cwd=tmp_path, check=True, capture_output=True)
    port = free_port()
    command = [str(BIN / "python"), "-m", "service.server", "--port", str(port), "--workers", "2"]
    stopped = launch(command, env, tmp_path, port, ready_path=None)
    assert stopped.process.wait(30) == 3
    assert '"event":"limits_need_redis"' in stopped.log_text()  # the supervisor's own lines are text


def test_a_second_process_on_the_same_sqlite_file_never_counts_apart(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, upstream: MockUpstream
) -> None:
    """Two gateways started apart (no supervisor, no WEB_CONCURRENCY) on one SQLite file: the first
    keeps the limits in its memory, the second knows it would count apart and refuses limits, and a
    third cannot start once limits are stored; limits are never kept per process."""
    first = make_gateway()
    second = make_gateway()
    assert httpx.get(f"{first.url}/readyz").json()["limits"] == "memory"
    assert httpx.get(f"{second.url}/readyz").json()["limits"] == "unshared"
    key = first.create_key("team_two")
    refused = httpx.patch(f"{second.url}/teams/team_two", json={"limits": {"maxConcurrent": 5}}, headers=ADMIN)
    assert refused.status_code == 409 and "SQLite" in refused.json()["error"]
    limits = {"limits": {"requestsPerMinute": 1}}
    assert httpx.patch(f"{first.url}/teams/team_two", json=limits, headers=ADMIN).status_code == 200
    body = {"model": "gpt-4o-mini", "messages": []}
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(f"{first.url}/openai/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert httpx.post(f"{first.url}/openai/v1/chat/completions", json=body, headers=auth).status_code == 429

    def unshared_answer() -> bool:  # once the second process's key cache holds the new limits
        answer = httpx.post(f"{second.url}/openai/v1/chat/completions", json=body, headers=auth)
        return answer.status_code == 503 and "REDIS_URL" in answer.text

    wait_until(unshared_answer, 5, "the second process refusing the limited request")
    port = free_port()
    env = gateway_env(upstream.url, tmp_path)
    third = launch(
        [str(BIN / "python"), "-m", "service.server", "--port", str(port)], env, tmp_path, port, ready_path=None
    )
    assert third.process.wait(30) == 3
    assert "limits_need_redis" in third.log_text()
