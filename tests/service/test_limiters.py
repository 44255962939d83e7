"""Both limiters, in memory and on the real Redis, against the same expectations: requests and
tokens per minute, concurrency, budgets with reservations, leases that expire, seeding from the
ledger, several processes sharing one Redis, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
import redis.asyncio

from service.core.errors import ServiceUnavailable, TooManyRequests
from service.core.limits import scripts
from service.core.limits.memory import MemoryLimiter
from service.core.limits.model import Limits, period_bounds, period_key, usd
from service.core.limits.outcome import Subject, duration
from service.core.limits.redis_limiter import RedisLimiter
from tests.redis_server import REDIS_URL, PrivateRedis
from tests.support import eventually

LEDGER_SPENT = 40
Limiter = MemoryLimiter | RedisLimiter


async def seed(subject: Subject, period: str) -> int:
    return LEDGER_SPENT if subject.kind == "team" else 0


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Limiter]]:
    """Limiters of one kind; the Redis ones share one key prefix, as processes of one gateway do."""
    started: list[Limiter] = []
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else ""
    memory: MemoryLimiter | None = None

    def build(lease_seconds: float = 60.0) -> Limiter:
        nonlocal memory
        limiter: Limiter
        if request.param == "memory":
            memory = memory or MemoryLimiter(seed, lease_seconds)
            limiter = memory
        else:
            limiter = RedisLimiter(REDIS_URL, prefix, seed, lease_seconds=lease_seconds)
        started.append(limiter)
        return limiter

    yield build
    for limiter in started:
        await limiter.stop()


def team(**limits: int | str | None) -> Subject:
    return Subject("team", "team_1", Limits(**limits))  # type: ignore[arg-type]


def key(**limits: int | str | None) -> Subject:
    return Subject("key", "key_0123456789abcdef", Limits(**limits))  # type: ignore[arg-type]


async def refused(limiter: Limiter, subjects: list[Subject], tokens: int = 0, cost: int = 0) -> TooManyRequests:
    with pytest.raises(TooManyRequests) as caught:
        await limiter.admit(subjects, tokens, cost, "refused")
    return caught.value


async def settled(limiter: Limiter, subject: Subject, **expected: int | None) -> None:
    """Releases reach Redis from a background task: wait until the state shows them."""

    async def matches() -> bool:
        try:
            state = await limiter.state(subject)
        except ServiceUnavailable:  # Redis still away
            return False
        return all(getattr(state, name) == value for name, value in expected.items())

    await eventually(matches, 5, f"the state {expected}")


async def test_requests_per_minute_are_exact_across_processes(make: Callable[..., Limiter]) -> None:
    first, second = make(), make()
    await first.start()
    await second.start()
    subject = team(requests_per_minute=5)
    grants = [await (first if n % 2 else second).admit([subject], 0, 0, f"lease-{n}") for n in range(5)]
    assert dict(grants[-1].headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert dict(grants[0].headers)[b"x-ratelimit-limit-requests"] == b"5"
    refusal = await refused(second, [subject])
    assert refusal.status == 429
    assert refusal.message == "Limit reached: team 'team_1' requests per minute (5)."
    headers = dict(refusal.headers)
    assert 1 <= int(headers[b"retry-after"]) <= 60
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    for grant in grants:
        (first if grant.lease[-1] in "13" else second).release(grant, 0, 0)
    await settled(first, subject, requests=5, in_flight=0)


async def test_concurrency_is_leased_and_released(make: Callable[..., Limiter]) -> None:
    limiter = make()
    await limiter.start()
    subject = key(max_concurrent=2)
    one = await limiter.admit([subject], 0, 0, "one")
    await limiter.admit([subject], 0, 0, "two")
    refusal = await refused(limiter, [subject])
    assert "key 'key_0123456789abcdef' concurrent requests (2)" in refusal.message
    assert dict(refusal.headers)[b"retry-after"] == b"1"
    limiter.release(one, 0, 0)
    limiter.release(one, 0, 0)  # a second release of the same grant changes nothing
    await settled(limiter, subject, in_flight=1)
    await limiter.admit([subject], 0, 0, "three")
    await refused(limiter, [subject])


async def test_a_request_passes_its_key_and_its_team(make: Callable[..., Limiter]) -> None:
    limiter = make()
    await limiter.start()
    loose, tight = team(requests_per_minute=10), key(requests_per_minute=1)
    grant = await limiter.admit([loose, tight], 0, 0, "one")
    assert dict(grant.headers)[b"x-ratelimit-limit-requests"] == b"1"  # the tightest
    refusal = await refused(limiter, [loose, tight])
    assert "key 'key_0123456789abcdef' requests per minute (1)" in refusal.message
    state = await limiter.state(loose)
    assert state.requests == 1  # a refused request is counted nowhere


async def test_the_headers_name_the_tightest_limit_of_each_kind(make: Callable[..., Limiter]) -> None:
    """Requests from the key, tokens from the team: both limiters answer alike, the resets when the
    request's own second leaves the window (a minute from now)."""
    limiter = make()
    await limiter.start()
    subjects = [team(requests_per_minute=10, tokens_per_minute=50), key(requests_per_minute=3, tokens_per_minute=1000)]
    headers = dict((await limiter.admit(subjects, 20, 0, "one")).headers)
    resets = [headers.pop(b"x-ratelimit-reset-requests").decode(), headers.pop(b"x-ratelimit-reset-tokens").decode()]
    assert headers == {
        b"x-ratelimit-limit-requests": b"3",
        b"x-ratelimit-remaining-requests": b"2",
        b"x-ratelimit-limit-tokens": b"50",
        b"x-ratelimit-remaining-tokens": b"30",
    }
    for reset in resets:
        assert reset == "60s" or (reset.endswith("s") and 58.9 <= float(reset.removesuffix("s")) < 60), reset


async def test_tokens_per_minute_settle_to_the_real_count(make: Callable[..., Limiter]) -> None:
    limiter = make()
    await limiter.start()
    subject = team(tokens_per_minute=100)
    grant = await limiter.admit([subject], 30, 0, "one")
    assert dict(grant.headers)[b"x-ratelimit-remaining-tokens"] == b"70"
    limiter.release(grant, 95, 0)  # the upstream counted 95 (prompt and answer)
    await settled(limiter, subject, tokens=95)
    refusal = await refused(limiter, [subject], tokens=10)
    assert "tokens per minute (100)" in refusal.message
    await limiter.admit([subject], 5, 0, "two")


async def test_budgets_reserve_the_worst_case_and_settle_the_real_cost(make: Callable[..., Limiter]) -> None:
    first, second = make(), make()
    await first.start()
    await second.start()
    subject = team(budget_micro_usd=100, budget_period="month")
    one = await first.admit([subject], 0, 30, "one")  # 40 spent (from the ledger) + 30 reserved
    state = await second.state(subject)
    assert (state.spent, state.reserved) == (LEDGER_SPENT, 30)
    two = await second.admit([subject], 0, 30, "two")
    refusal = await refused(first, [subject], cost=1)  # 40 + 60 reserved: no room for one more micro-dollar
    assert "team 'team_1' budget ($0.000100 per month; $0.000040 spent, $0.000060 reserved" in refusal.message
    assert dict(refusal.headers)[b"retry-after"] == b"1"  # requests in flight hold the room
    first.release(one, 10, 12)
    second.release(two, 10, 0)
    await settled(first, subject, spent=52, reserved=0)
    refusal = await refused(first, [subject], cost=49)  # 52 + 49 > 100: only the period's end helps
    _, reset = period_bounds("month", datetime.now(UTC))
    assert reset is not None
    assert int(dict(refusal.headers)[b"retry-after"]) > 1
    three = await first.admit([subject], 0, 48, "three")
    first.release(three, 10, 60)  # it cost more than it reserved: 112 spent of 100
    await settled(first, subject, spent=112, reserved=0)
    await refused(first, [subject], cost=1)
    await second.admit([subject], 0, 0, "a read")  # reserves nothing, spends nothing: never refused


async def test_leases_of_a_process_that_stops_renewing_expire(make: Callable[..., Limiter]) -> None:
    limiter = make(lease_seconds=0.3)
    await limiter.start()
    subject = team(max_concurrent=1, budget_micro_usd=100, budget_period="day")
    await limiter.admit([subject], 0, 50, "never-released")
    await refused(limiter, [subject])
    if isinstance(limiter, RedisLimiter):
        limiter._held.clear()  # as if its process had died: nobody renews the lease
    await settled(limiter, subject, in_flight=0, reserved=0)
    await limiter.admit([subject], 0, 50, "next")


async def test_a_running_request_keeps_its_lease(redis_prefix: str) -> None:
    limiter = RedisLimiter(REDIS_URL, redis_prefix, seed, lease_seconds=0.6)
    await limiter.start()
    try:
        subject = team(max_concurrent=1, budget_micro_usd=1000, budget_period="day")
        grant = await limiter.admit([subject], 0, 40, "long")
        await asyncio.sleep(1.5)  # well past its first expiry: renewed meanwhile, with what it reserved
        state = await limiter.state(subject)
        assert (state.in_flight, state.reserved) == (1, 40)
        limiter.release(grant, 0, 30)
        await settled(limiter, subject, in_flight=0, reserved=0)
        assert (await limiter.state(subject)).spent == (state.spent or 0) + 30
    finally:
        await limiter.stop()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_redis_stopped_and_restarted(private_redis: PrivateRedis, fail_mode: str) -> None:
    limiter = RedisLimiter(private_redis.url, "gw:", seed, fail_mode=fail_mode)
    await limiter.start()
    try:
        subject = team(requests_per_minute=100, budget_micro_usd=1000, budget_period="total")
        held = await limiter.admit([subject], 0, 10, "before")
        private_redis.stop()
        if fail_mode == "open":
            grant = await limiter.admit([subject], 0, 10, "during")
            assert grant.offline and grant.headers == []
            limiter.release(grant, 0, 7)
        else:
            with pytest.raises(ServiceUnavailable):
                await limiter.admit([subject], 0, 10, "during")
        assert limiter.degraded
        limiter.release(held, 0, 5)
        private_redis.start()
        await eventually(lambda: not limiter.degraded, 10, "recovery without a restart")
        # Redis came back empty: the spent amount is seeded from the ledger again
        await settled(limiter, subject, spent=LEDGER_SPENT, reserved=0, in_flight=0)
        grant = await limiter.admit([subject], 0, 10, "after")
        assert dict(grant.headers)[b"x-ratelimit-remaining-requests"] == b"99"
    finally:
        await limiter.stop()


async def test_releases_during_an_outage_are_sent_when_redis_answers(private_redis: PrivateRedis) -> None:
    """A Redis that comes back with its data (a network cut) gets the costs settled meanwhile."""
    limiter = RedisLimiter(private_redis.url, "gw:", seed)
    await limiter.start()
    try:
        subject = team(budget_micro_usd=1000, budget_period="day")
        grant = await limiter.admit([subject], 0, 10, "one")
        await limiter.client.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # unreachable for 1.5 s
        limiter.release(grant, 0, 7)
        await settled(limiter, subject, spent=LEDGER_SPENT + 7, reserved=0)
    finally:
        await limiter.stop()


def test_periods_are_calendar_utc() -> None:
    moment = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)  # a Thursday
    assert period_bounds("day", moment) == (datetime(2026, 12, 31, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("week", moment) == (datetime(2026, 12, 28, tzinfo=UTC), datetime(2027, 1, 4, tzinfo=UTC))
    assert period_bounds("month", moment) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("total", moment) == (None, None)
    assert period_key("month", datetime(2026, 2, 14, tzinfo=UTC)) == "2026-02-01"
    assert period_key("total", moment) == "total"


def test_durations_and_dollars_as_shown() -> None:
    assert [duration(s) for s in (0.02, 1.5, 59.9994, 90)] == [b"20ms", b"1.5s", b"59.999s", b"1m30s"]
    assert [duration(s) for s in (-3, 0, 0.9996, 1, 59.9996, 60)] == [b"0ms", b"0ms", b"1000ms", b"1s", b"60s", b"1m0s"]
    assert usd(1) == 0.000001
    assert usd(None) is None


async def test_redis_writes_reset_times_as_the_gateway_does() -> None:
    """The Redis limiter's headers take the reset time as its script wrote it: the same text as the
    memory limiter's for every whole millisecond."""
    samples = [0, 1, 20, 999, 1000, 1001, 1010, 1100, 1230, 1500, 9999, 30000, 59001, 59999, 60000]
    samples += [60499, 60500, 61000, 90000, 119500, 3_600_000]
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        each = "local out = {} for i, ms in ipairs(ARGV) do out[i] = duration(tonumber(ms)) end return out"
        written = await client.eval(scripts.DURATION + each, 0, *samples)
    finally:
        await client.aclose()
    assert written == [duration(ms / 1000) for ms in samples]
    assert written[:4] == [b"0ms", b"1ms", b"20ms", b"999ms"]
    assert written[6:8] == [b"1.01s", b"1.1s"]
    assert written[15:17] == [b"1m0s", b"1m1s"]


async def test_seconds_leave_the_redis_window_as_they_age(redis_prefix: str) -> None:
    """The window's sums lose exactly the seconds older than 60 s, whether a few left since the last
    check or the whole window did; the oldest second left is where room comes back."""
    limiter = RedisLimiter(REDIS_URL, redis_prefix, seed)
    await limiter.start()
    try:
        subject = team(requests_per_minute=100, tokens_per_minute=1000)
        await limiter.admit([subject], 7, 0, "now")  # this second: 1 request, 7 tokens
        window = f"{redis_prefix}team:team_1:m"
        second = int((await limiter.client.time())[0])
        old = {second - 70: (5, 50), second - 61: (3, 30), second - 59: (2, 20), second - 30: (1, 10)}
        for at, (requests, tokens) in old.items():
            await limiter.client.hset(window, mapping={f"r{at}": requests, f"t{at}": tokens})
        await limiter.client.hset(window, mapping={"o": second - 70, "R": 1 + 11, "T": 7 + 110})
        state = await limiter.state(subject)
        assert (state.requests, state.tokens) == (1 + 2 + 1, 7 + 20 + 10)  # what is 60 s old or more is gone
        assert not await limiter.client.hexists(window, f"r{second - 61}")
        grant = await limiter.admit([subject], 3, 0, "next")
        headers = dict(grant.headers)
        assert headers[b"x-ratelimit-remaining-requests"] == b"95"
        assert headers[b"x-ratelimit-remaining-tokens"] == b"960"
        reset = headers[b"x-ratelimit-reset-requests"].decode()
        assert reset.endswith("ms") or float(reset.removesuffix("s")) <= 2  # the oldest left is 59 s old
        await limiter.client.hset(window, mapping={"o": second - 200})  # an idle minute and more: all gone
        state = await limiter.state(subject)
        assert (state.requests, state.tokens) == (0, 0)
    finally:
        await limiter.stop()


async def test_a_redis_window_with_empty_seconds_before_its_oldest_request(redis_prefix: str) -> None:
    """Trimmed, the window starts at its oldest request, past the empty seconds before it: the reset
    is when that request leaves the window."""
    limiter = RedisLimiter(REDIS_URL, redis_prefix, seed)
    await limiter.start()
    try:
        subject = team(requests_per_minute=100, tokens_per_minute=1000)
        window = f"{redis_prefix}team:team_1:m"
        second = int((await limiter.client.time())[0])
        seconds = {second - 62: (1, 5), second - 50: (4, 0), second - 40: (1, 30)}  # requests, tokens
        for at, (requests, tokens) in seconds.items():
            await limiter.client.hset(window, mapping={f"r{at}": requests, f"t{at}": tokens})
        await limiter.client.hset(window, mapping={"o": second - 62, "R": 6, "T": 35})
        for lease in ("one", "two"):
            headers = dict((await limiter.admit([subject], 0, 0, lease)).headers)
            reset = float(headers[b"x-ratelimit-reset-requests"].decode().removesuffix("s"))
            assert 8 <= reset <= 10  # the 4 requests 50 s old leave in 10 s
            reset = float(headers[b"x-ratelimit-reset-tokens"].decode().removesuffix("s"))
            assert 18 <= reset <= 20  # the 30 tokens 40 s old in 20 s
        assert headers[b"x-ratelimit-remaining-requests"] == b"93"
        assert headers[b"x-ratelimit-remaining-tokens"] == b"970"
        assert int(await limiter.client.hget(window, "o")) == second - 50
    finally:
        await limiter.stop()


async def test_the_memory_window_forgets_what_is_a_minute_old() -> None:
    now = [1_000_000.0]
    limiter = MemoryLimiter(seed, clock=lambda: now[0])
    subject = team(requests_per_minute=2, tokens_per_minute=100)
    first = await limiter.admit([subject], 40, 0, "first")
    now[0] += 30
    second = await limiter.admit([subject], 40, 0, "second")
    limiter.release(first, 10, 0)  # settled in its own second, still in the window
    assert (await limiter.state(subject)).tokens == 50
    refusal = await refused(limiter, [subject])
    assert "requests per minute (2)" in refusal.message
    assert dict(refusal.headers)[b"retry-after"] == b"30"  # when the first request's second leaves
    now[0] += 31  # the first request's second has left the window
    limiter.release(second, 40, 0)
    state = await limiter.state(subject)
    assert (state.requests, state.tokens, state.in_flight) == (1, 40, 0)
    grant = await limiter.admit([subject], 0, 0, "third")
    assert dict(grant.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    now[0] += 120
    limiter.release(grant, 5, 0)  # its second left the window before it ended: nothing to correct
    assert (await limiter.state(subject)).tokens == 0


async def test_a_release_rides_on_the_next_admission(redis_prefix: str) -> None:
    limiter = RedisLimiter(REDIS_URL, redis_prefix, seed)
    await limiter.start()
    try:
        subject = team(max_concurrent=1, tokens_per_minute=1000)
        grant = await limiter.admit([subject], 30, 0, "one")
        limiter.release(grant, 12, 0)
        await limiter.admit([subject], 5, 0, "two")  # in the same loop turn: the release goes first, in its write
        state = await limiter.state(subject)
        assert (state.in_flight, state.tokens, state.requests) == (1, 12 + 5, 2)
    finally:
        await limiter.stop()


async def test_a_release_sent_again_counts_once(redis_prefix: str) -> None:
    """A batch of releases whose reply was lost with the connection is sent again: each release
    counts once, whether its lease was still held, swept as expired meanwhile, gone with the keys
    that held it, or never taken (admitted unchecked while Redis was away)."""
    limiter = RedisLimiter(REDIS_URL, redis_prefix, seed, lease_seconds=1.0)
    await limiter.start()
    try:
        subject = team(max_concurrent=5, tokens_per_minute=10_000, budget_micro_usd=1000, budget_period="day")
        held = await limiter.admit([subject], 100, 50, "held")
        swept = await limiter.admit([subject], 100, 50, "swept")
        limiter._held.pop(swept.lease)  # nobody renews it: it expires
        await asyncio.sleep(1.3)
        state = await limiter.state(subject)  # sweeps it: its reservation given back
        assert (state.in_flight, state.reserved, state.spent) == (1, 50, LEDGER_SPENT)
        shape = limiter._shape([subject], datetime.now(UTC).timestamp())
        unchecked = type(held)("unchecked", [subject], 0, 0, 0, shape.periods, [], shape, offline=True)
        for grant, tokens, cost in ((held, 80, 20), (swept, 90, 30), (unchecked, 0, 7)):
            grant.released = True
            for _ in range(3):  # written, then written again twice
                assert await limiter._script(limiter._settle_command([(grant, tokens, cost)])) == 1
        state = await limiter.state(subject)
        assert (state.in_flight, state.reserved) == (0, 0)
        assert state.spent == LEDGER_SPENT + 20 + 30 + 7
        assert state.tokens == 80 + 90
        assert state.requests == 2
        # its lease gone with what the leases reserve (the keys expired, or Redis lost them): once too
        lost = await limiter.admit([subject], 10, 40, "lost")
        limiter._held.pop(lost.lease)
        await limiter.client.delete(redis_prefix + subject.name + ":l", redis_prefix + subject.name + ":r")
        lost.released = True
        for _ in range(3):
            assert await limiter._script(limiter._settle_command([(lost, 10, 25)])) == 1
        assert (await limiter.state(subject)).spent == LEDGER_SPENT + 57 + 25
        # the marks are kept apart from the leases: the concurrency limit sees none of them
        grants = [await limiter.admit([subject], 1, 1, f"next-{n}") for n in range(5)]
        await refused(limiter, [subject], 1, 1)
        for grant in grants:
            limiter.release(grant, 1, 1)
        await settled(limiter, subject, in_flight=0, reserved=0, spent=LEDGER_SPENT + 57 + 25 + 5)
        # the marks of releases counted without their lease stay (a swept lease's went with its
        # release), kept an hour from the last written; older marks go when one is written
        marks = redis_prefix + subject.name + ":lx"
        assert sorted(await limiter.client.zrange(marks, 0, -1)) == [b"lost 40 counted", b"unchecked 0 counted"]
        assert 3_500_000 < await limiter.client.pttl(marks) <= 3_600_000
        (seconds, micros) = await limiter.client.time()
        now = seconds * 1000 + micros // 1000
        await limiter.client.zadd(marks, {"aged 5": now - 3_700_000, "recent 5": now - 3_500_000})
        again = type(held)("again", [subject], 0, 0, 0, shape.periods, [], shape, offline=True)
        assert await limiter._script(limiter._settle_command([(again, 0, 1)])) == 1
        expected = [b"again 0 counted", b"lost 40 counted", b"recent 5", b"unchecked 0 counted"]
        assert sorted(await limiter.client.zrange(marks, 0, -1)) == expected
    finally:
        await limiter.stop()


async def test_a_redis_that_lost_its_scripts_is_given_them_again(private_redis: PrivateRedis) -> None:
    """A flushed (or restarted) Redis answers NOSCRIPT: admissions, releases and state load the
    scripts again and go on, nothing refused and no lease left behind."""
    limiter = RedisLimiter(private_redis.url, "gw:", seed)
    await limiter.start()
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        subject = team(max_concurrent=1)
        grant = await limiter.admit([subject], 0, 0, "one")
        await admin.script_flush()
        limiter.release(grant, 0, 0)  # written at once: NOSCRIPT, kept, sent again by the task
        await settled(limiter, subject, in_flight=0)
        await admin.script_flush()
        assert (await limiter.state(subject)).in_flight == 0  # the state alone, after a flush
        await admin.script_flush()
        second = await limiter.admit([subject], 0, 0, "two")  # the admission, after a flush
        assert (await limiter.state(subject)).in_flight == 1
        limiter.release(second, 0, 0)
        await settled(limiter, subject, in_flight=0)
    finally:
        await admin.aclose()
        await limiter.stop()


async def test_a_refusal_tells_of_every_subjects_current_window() -> None:
    """Refused by the key, the headers still show the team's window as it is now: the tokens that
    left it are not counted."""
    now = [1_000_000.0]
    limiter = MemoryLimiter(seed, clock=lambda: now[0])
    the_team, the_key = team(tokens_per_minute=10_000), key(requests_per_minute=1)
    await limiter.admit([the_team], 500, 0, "through-another-key")
    now[0] += 30
    await limiter.admit([the_key, the_team], 100, 0, "first")
    now[0] += 45  # the 500 tokens have left the team's window, the key's request has not
    headers = dict((await refused(limiter, [the_key, the_team])).headers)
    assert headers[b"x-ratelimit-remaining-tokens"] == b"9900"
    assert headers[b"x-ratelimit-reset-tokens"] == b"15s"
