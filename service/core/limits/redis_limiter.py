"""Limits kept in Redis, exact across every worker and replica sharing it.

Each admission is one script run (``scripts.ADMIT``: sweep, check every subject, reserve on all, or
refuse, atomically on the server). Releases are queued and sent by one background task, several
per round trip, so the request path never waits for them; the same task renews the leases of
requests still running (a process that dies stops renewing, and its leases expire by themselves
after ``LIMITS_LEASE_SECONDS``).

The spent amount of a budget period lives under a key named after the period, so a new period is a
new key. A key that is missing (first use, a Redis restarted empty, a period just begun) is seeded
from the usage ledger's daily totals, the source of truth, before anything is admitted against it.

Redis unreachable: one ``limits_unavailable`` line, ``degraded`` set (the gauge and ``/readyz`` read
it), and requests under limits are admitted without them (``LIMITS_FAIL_MODE=open``) or get 503
(``closed``). Releases wait in memory (bounded) and are sent when Redis answers again; a request
admitted during the outage adds its cost to the period's spent amount when that still exists (a
Redis that came back empty seeds it from the ledger, which has those costs already).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.core.errors import ServiceUnavailable
from service.core.limits import scripts
from service.core.limits.memory import Seeder
from service.core.limits.model import period_bounds
from service.core.limits.outcome import Grant, Subject, SubjectState, Tally, budget_retry, rate_headers, refusal

log = structlog.get_logger("gateway.limits")

TIMEOUT_SECONDS = 1.0
PROBE_SECONDS = 1.0
MAX_PENDING = 100_000
SPENT_KEPT_SECONDS = 40 * 86_400
"""How long a period's spent amount outlives the period (it is read again only to show it)."""
UNAVAILABLE = "Limits cannot be checked right now (their store is unreachable); try again shortly."
ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class RedisLimiter:
    kind = "redis"

    def __init__(
        self, url: str, prefix: str, seed: Seeder, *, lease_seconds: float = 60.0, fail_mode: str = "open"
    ) -> None:
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self.prefix = prefix
        self.seed = seed
        self.lease_ms = int(lease_seconds * 1000)
        self.renew_every = max(0.2, lease_seconds / 3)
        self.fail_open = fail_mode == "open"
        self._admit = self.client.register_script(scripts.ADMIT)
        self._settle = self.client.register_script(scripts.SETTLE)
        self._renew = self.client.register_script(scripts.RENEW)
        self._state = self.client.register_script(scripts.STATE)
        self.down_since: float | None = None
        self._held: dict[str, Grant] = {}
        self._pending: list[tuple[Grant, int, int]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.client.ping()
        except ERRORS as exc:
            self._down(exc)
        self._task = asyncio.create_task(self._run(), name="limits-settle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(*ERRORS):
            await asyncio.wait_for(self._flush(), TIMEOUT_SECONDS * 2)  # the releases of the last requests
        await self.client.aclose()

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error(
                "limits_unavailable",
                error=type(exc).__name__,
                fail_mode="open" if self.fail_open else "closed",
                message="Redis is unreachable: "
                + ("requests under limits pass unchecked" if self.fail_open else "requests under limits get 503"),
            )

    def _up(self) -> None:
        if self.down_since is not None:
            log.info("limits_recovered", outage_seconds=round(time.monotonic() - self.down_since, 3))
            self.down_since = None
            self._wake.set()

    # -- keys -------------------------------------------------------------------------------------

    def _keys(self, subject: Subject, period: str | None) -> list[str]:
        base = self.prefix + subject.name
        return [base + ":w", base + ":l", base + ":a", f"{base}:s:{period or '-'}"]

    # -- admission --------------------------------------------------------------------------------

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        clock = time.time()
        periods = tuple(subject.period(clock) for subject in subjects)
        keys = [key for subject, period in zip(subjects, periods, strict=True) for key in self._keys(subject, period)]
        args: list[int | str] = [lease, self.lease_ms, tokens, cost]
        for subject in subjects:
            limits = subject.limits
            for value in (
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.max_concurrent,
                limits.budget_micro_usd,
            ):
                args.append(-1 if value is None else value)
        try:
            for _ in range(len(subjects) + 1):
                result: list[Any] = await self._admit(keys=keys, args=args)
                if result[0] != b"seed":
                    break
                index = int(result[1]) - 1
                await self._seed_spent(subjects[index], periods[index], keys[4 * index + 3])
        except ERRORS as exc:
            self._down(exc)
            if not self.fail_open:
                raise ServiceUnavailable(UNAVAILABLE) from None
            return Grant(lease, subjects, 0, 0, 0, periods, [], offline=True)
        self._up()
        now = int(result[1]) / 1000
        if result[0] == b"no":
            index = int(result[2]) - 1
            kind = result[3].decode()
            spent, reserved = int(result[4]), int(result[5])
            tallies = _tallies(result[6:])
            subject = subjects[index]
            if kind == "rpm":
                wait = tallies[index].oldest_request + 60 - now
            elif kind == "tpm":
                oldest = tallies[index].oldest_token
                wait = (oldest if oldest >= 0 else int(now)) + 60 - now
            elif kind == "budget":
                wait = budget_retry(subject, spent, cost, now)
            else:
                wait = 1
            raise refusal(subject, kind, wait, subjects, tallies, now, spent=spent, reserved=reserved)
        grant = Grant(
            lease, subjects, int(now), tokens, cost, periods, rate_headers(subjects, _tallies(result[2:]), now)
        )
        self._held[lease] = grant
        return grant

    async def _seed_spent(self, subject: Subject, period: str | None, key: str) -> None:
        assert period is not None
        spent = await self.seed(subject, period)
        _, reset = period_bounds(subject.limits.budget_period or "month", datetime.now(UTC))
        ttl = None if reset is None else int(reset.timestamp() - time.time()) + SPENT_KEPT_SECONDS
        await self.client.set(key, spent, nx=True, ex=ttl)

    # -- release ----------------------------------------------------------------------------------

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """Queue the request's release; sent at once by the background task, never awaited here."""
        if grant.released:
            return
        grant.released = True
        self._held.pop(grant.lease, None)
        if grant.offline and cost <= 0:
            return
        if len(self._pending) >= MAX_PENDING:
            log.error("limits_releases_dropped", count=len(self._pending))
            self._pending.clear()
        self._pending.append((grant, tokens, cost))
        self._wake.set()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:500], self._pending[500:]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for grant, tokens, cost in batch:
                        keys = [k for s, p in zip(grant.subjects, grant.periods, strict=True) for k in self._keys(s, p)]
                        delta = 0 if grant.offline else tokens - grant.tokens
                        await self._settle(keys=keys, args=[grant.lease, grant.second, delta, cost], client=pipe)
                    await pipe.execute()
            except BaseException:
                self._pending = batch + self._pending
                raise

    async def _renew_held(self) -> None:
        if not self._held:
            return
        keys: list[str] = []
        leases: list[str] = []
        for grant in list(self._held.values()):
            for subject, period in zip(grant.subjects, grant.periods, strict=True):
                keys += self._keys(subject, period)[1:3]  # the leases and their amounts
                leases.append(grant.lease)
        await self._renew(keys=keys, args=[self.lease_ms, *leases])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            timeout = PROBE_SECONDS if self.degraded else max(0.0, renewed + self.renew_every - loop.time())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                if self.degraded:
                    await self.client.ping()
                    self._up()
                await self._flush()
                if loop.time() - renewed >= self.renew_every:
                    renewed = loop.time()
                    await self._renew_held()
            except ERRORS as exc:
                self._down(exc)

    # -- state ------------------------------------------------------------------------------------

    async def state(self, subject: Subject) -> SubjectState:
        period = subject.period(time.time())
        keys = self._keys(subject, period)
        try:
            found: list[Any] = await self._state(keys=keys, args=[])
            if int(found[4]) < 0 and period is not None:
                await self._seed_spent(subject, period, keys[3])
                found = await self._state(keys=keys, args=[])
        except ERRORS as exc:
            self._down(exc)
            raise ServiceUnavailable(UNAVAILABLE) from None
        self._up()
        spent = int(found[4])
        return SubjectState(spent if spent >= 0 else None, int(found[3]), int(found[0]), int(found[1]), int(found[2]))


def _tallies(flat: Sequence[Any]) -> list[Tally]:
    return [Tally(*(int(v) for v in flat[i : i + 4])) for i in range(0, len(flat), 4)]
