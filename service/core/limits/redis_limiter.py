"""Limits kept in Redis, exact across every worker and replica sharing it.

Each admission is one script run (``scripts.ADMIT``: sweep, check every subject, reserve on all, or
refuse, atomically on the server), sent through the limits' own lean connection (``resp``): one
write and one read per request, shared by the requests of one loop turn under load. A release is
written on the same connection as soon as the event loop is free, never awaited by the request: the
releases of one loop turn go in one script call (``scripts.SETTLE``), in the same write as an
admission when one is made in that turn. A release Redis did not take is kept and retried by one
background task, which also renews the leases of requests still running (a process that dies stops
renewing, and its leases expire by themselves after ``LIMITS_LEASE_SECONDS``).

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
import hashlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.core.errors import ServiceUnavailable
from service.core.limits import scripts
from service.core.limits.memory import Seeder
from service.core.limits.model import period_bounds
from service.core.limits.outcome import (
    Grant,
    Subject,
    SubjectState,
    Tally,
    budget_retry,
    periods_at,
    refusal,
    written_rate_headers,
)
from service.core.limits.resp import Reply, ReplyError, RespConnection, encode

log = structlog.get_logger("gateway.limits")

TIMEOUT_SECONDS = 1.0
PROBE_SECONDS = 1.0
MAX_PENDING = 100_000
SETTLE_BATCH = 200
"""Releases per script call."""
SPENT_KEPT_SECONDS = 40 * 86_400
"""How long a period's spent amount outlives the period (it is read again only to show it)."""
UNAVAILABLE = "Limits cannot be checked right now (their store is unreachable); try again shortly."
ERRORS = (RedisError, OSError, asyncio.TimeoutError)
Release = tuple[Grant, int, int]
"""A grant released, with its real tokens and cost."""


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest().encode()


ADMIT_SHA, SETTLE_SHA, STATE_SHA = _sha(scripts.ADMIT), _sha(scripts.SETTLE), _sha(scripts.STATE)
LOAD_SCRIPTS = b"".join(encode("SCRIPT", "LOAD", script) for script in (scripts.ADMIT, scripts.SETTLE, scripts.STATE))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _int(value: int) -> bytes:
    return _bulk(b"%d" % value)


class _Shape(NamedTuple):
    """The parts of a script call fixed by a request's subjects and their budget periods, made once
    per subjects tuple and kept while the periods last (from ``start`` to ``end``)."""

    subjects: Sequence[Subject]
    periods: tuple[str | None, ...]
    admit: bytes
    """``EVALSHA``, the admission script, its keys, the subjects' limits and the lease's life: all but
    the request's own argument."""
    keys: bytes
    """The subjects' keys, as the release script takes them."""
    settle: bytes
    """``EVALSHA``, the release script and the keys: a release's script call, but for its argument."""
    start: float
    end: float
    rated: bool
    """Whether a subject has a requests or a tokens per minute limit (the response says how much is left)."""


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
        """Lease renewals and probes."""
        self.lane = RespConnection(url, TIMEOUT_SECONDS)
        """Admissions, releases, state and seeding: one connection, so each reads after every release
        written before it."""
        self.prefix = prefix
        self.seed = seed
        self.lease_ms = int(lease_seconds * 1000)
        self.renew_every = max(0.2, lease_seconds / 3)
        self.fail_open = fail_mode == "open"
        self._renew = self.client.register_script(scripts.RENEW)
        self.down_since: float | None = None
        self._held: dict[str, Grant] = {}
        self._pending: list[Release] = []
        self._sending = False
        """A send of the pending releases is scheduled for the end of this loop turn."""
        self._shapes: dict[int, _Shape] = {}
        self._lease_args = _int(self.lease_ms) + _int(self.lease_ms + 60_000)
        """The lease's life and how long the keys holding leases outlive a new one, as the admission
        script takes them."""
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
        self.lane.close()
        await self.client.aclose()

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._wake.set()  # the background task probes from now on
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

    # -- keys and commands ------------------------------------------------------------------------

    def _keys(self, subject: Subject, period: str | None) -> list[str]:
        base = self.prefix + subject.name
        return [base + ":m", base + ":l", base + ":r", f"{base}:s:{period or '-'}"]

    def _shape(self, subjects: Sequence[Subject], clock: float) -> _Shape:
        """``subjects``'s shape at ``clock``, kept by the identity of ``subjects`` (the limits gate
        keeps one tuple per key and team)."""
        found = self._shapes.get(id(subjects))
        if found is not None and found.subjects is subjects and found.start <= clock < found.end:
            return found
        if len(self._shapes) >= 10_000:
            self._shapes.clear()
        periods, start, end = periods_at(subjects, clock)
        keys = b"".join(
            _bulk(key.encode())
            for subject, period in zip(subjects, periods, strict=True)
            for key in self._keys(subject, period)
        )
        limits = b"".join(
            _int(-1 if value is None else value)
            for subject in subjects
            for value in (
                subject.limits.requests_per_minute,
                subject.limits.tokens_per_minute,
                subject.limits.max_concurrent,
                subject.limits.budget_micro_usd,
            )
        )
        count = len(subjects)
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (6 + 8 * count, ADMIT_SHA, _int(4 * count))
        rated = any(subject.rpm is not None or subject.tpm is not None for subject in subjects)
        found = self._shapes[id(subjects)] = _Shape(
            subjects,
            periods,
            head + keys + limits + self._lease_args,
            keys,
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s%s" % (4 + 4 * count, SETTLE_SHA, _int(4 * count), keys),
            start,
            end,
            rated,
        )
        return found

    def _settle_command(self, batch: Sequence[Release]) -> bytes:
        if len(batch) == 1:  # a release alone, as most are: the script call's head is its shape's
            grant, tokens, cost = batch[0]
            shape: _Shape = grant.place
            return shape.settle + _release_arg(grant, tokens, cost)
        keys: list[bytes] = []
        args: list[bytes] = []
        count = 0
        for grant, tokens, cost in batch:
            shape = grant.place
            keys.append(shape.keys)
            count += len(shape.subjects)
            args.append(_release_arg(grant, tokens, cost))
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (3 + 4 * count + len(batch), SETTLE_SHA, _int(4 * count))
        return b"".join((head, *keys, *args))

    async def _load_scripts(self) -> None:
        for reply in await self.lane.call(LOAD_SCRIPTS, 3):
            if isinstance(reply, ReplyError):
                raise reply

    async def _script(self, command: bytes) -> Reply:
        """A script call's reply, sent again once the scripts are loaded when Redis has none of them
        (``NOSCRIPT``: a restarted or flushed Redis)."""
        reply = (await self.lane.call(command))[0]
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            await self._load_scripts()
            reply = (await self.lane.call(command))[0]
        return reply

    # -- admission --------------------------------------------------------------------------------

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        shape = self._shape(subjects, time.time())
        periods = shape.periods
        own = f"{lease} {cost} {tokens}".encode()
        command = b"%s$%d\r\n%s\r\n" % (shape.admit, len(own), own)
        try:
            if self._pending and self.down_since is None:
                reply = await self._call_admit(command)
            else:
                reply = (await self.lane.call(command))[0]
            if reply.__class__ is not bytes or reply.startswith(b"seed"):
                reply = await self._admit_again(reply, command, subjects, periods)
        except ERRORS as exc:
            self._down(exc)
            if not self.fail_open:
                raise ServiceUnavailable(UNAVAILABLE) from None
            return Grant(lease, subjects, 0, 0, 0, periods, [], shape, offline=True)
        if self.down_since is not None:
            self._up()
        words = reply.split()
        if words[0] == b"ok":
            headers = written_rate_headers(words[2:]) if shape.rated else []
            grant = Grant(lease, subjects, int(words[1]), tokens, cost, periods, headers, shape)
            self._held[lease] = grant
            return grant
        now = int(words[1]) / 1000
        index = int(words[2]) - 1
        kind = words[3].decode()
        spent, reserved = int(words[4]), int(words[5])
        tallies = _tallies(subjects, words, 6)
        subject = subjects[index]
        if kind == "rpm":
            wait = tallies[index][3] + 60 - now
        elif kind == "tpm":
            oldest = tallies[index][4]
            wait = (oldest if oldest >= 0 else int(now)) + 60 - now
        elif kind == "budget":
            wait = budget_retry(subject, spent, cost, now)
        else:
            wait = 1
        raise refusal(subject, kind, wait, tallies, now, spent=spent, reserved=reserved)

    async def _admit_again(
        self, reply: Reply, command: bytes, subjects: Sequence[Subject], periods: tuple[str | None, ...]
    ) -> bytes:
        """The admission's ``ok`` or ``no`` after a first ``reply`` that was neither: the scripts
        loaded when Redis had none (``NOSCRIPT``), a budget period's spent amount seeded when
        missing (``seed <subject>``), and the admission sent again."""
        for _ in range(len(subjects) + 2):  # each reply looked at: NOSCRIPT once, a seed per subject, the answer
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                await self._load_scripts()
            elif not isinstance(reply, bytes):
                raise RedisError(f"the admission script answered {reply!r}")
            elif reply.startswith(b"seed"):
                index = int(reply.split()[1]) - 1
                await self._seed_spent(subjects[index], periods[index], self._keys(subjects[index], periods[index])[3])
            else:
                return reply
            reply = await self._call_admit(command)
        raise RedisError("the admission script asked to seed every time")

    async def _call_admit(self, command: bytes) -> Reply:
        """The admission's reply; the releases waiting to be sent go in the same write."""
        if not self._pending or self.down_since is not None:
            return (await self.lane.call(command))[0]
        batch = self._take()
        try:
            settled, admitted = await self.lane.call(self._settle_command(batch) + command, 2)
        except BaseException:
            self._keep(batch)
            raise
        if isinstance(settled, ReplyError):
            self._keep(batch)
        return admitted

    async def _seed_spent(self, subject: Subject, period: str | None, key: str) -> None:
        assert period is not None
        spent = await self.seed(subject, period)
        _, reset = period_bounds(subject.limits.budget_period or "month", datetime.now(UTC))
        ttl = None if reset is None else int(reset.timestamp() - time.time()) + SPENT_KEPT_SECONDS
        expiry = () if ttl is None else ("EX", ttl)
        reply = (await self.lane.call(encode("SET", key, spent, "NX", *expiry)))[0]
        if isinstance(reply, ReplyError):
            raise reply

    # -- release ----------------------------------------------------------------------------------

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """Queue the request's release, sent at the end of this loop turn; never awaited here."""
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
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().call_soon(self._send_pending)

    def _take(self) -> list[Release]:
        batch = self._pending
        if len(batch) <= SETTLE_BATCH:
            self._pending = []
            return batch
        batch, self._pending = batch[:SETTLE_BATCH], batch[SETTLE_BATCH:]
        return batch

    def _keep(self, batch: list[Release]) -> None:
        """Releases Redis did not take: back in front of the queue, for the background task."""
        self._pending[:0] = batch
        self._wake.set()

    def _send_pending(self) -> None:
        """The releases of this loop turn, written without waiting for Redis's answer; the
        background task sends them instead while Redis is away or the connection is not open."""
        self._sending = False
        if self.down_since is not None or not self.lane.connected:
            self._wake.set()
            return
        while self._pending:
            batch = self._take()
            self.lane.send(self._settle_command(batch), partial(self._settled, batch))

    def _settled(self, batch: list[Release], outcome: list[Reply] | Exception) -> None:
        if isinstance(outcome, Exception) or isinstance(outcome[0], ReplyError):
            self._keep(batch)

    async def _flush(self) -> None:
        while self._pending:
            batch = self._take()
            try:
                reply = await self._script(self._settle_command(batch))
                if isinstance(reply, ReplyError):
                    raise reply
            except BaseException:
                self._pending[:0] = batch
                raise

    async def _renew_held(self) -> None:
        if not self._held:
            return
        keys: list[str] = []
        leases: list[str] = []
        for grant in list(self._held.values()):
            for subject, period in zip(grant.subjects, grant.periods, strict=True):
                keys += self._keys(subject, period)[1:3]  # the leases and what they reserve
                leases.append(f"{grant.lease} {grant.cost}")
        await self._renew(keys=keys, args=[self.lease_ms, *leases])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            timeout = PROBE_SECONDS if self.degraded else max(0.0, renewed + self.renew_every - loop.time())
            with contextlib.suppress(TimeoutError):  # not wait_for, which may swallow a cancellation (3.11)
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
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

    async def _read_state(self, keys: list[str]) -> list[Any]:
        reply = await self._script(encode("EVALSHA", STATE_SHA, 4, *keys))
        if not isinstance(reply, list):
            raise reply if isinstance(reply, ReplyError) else RedisError(f"the state script answered {reply!r}")
        return reply

    async def state(self, subject: Subject) -> SubjectState:
        period = subject.period(time.time())
        keys = self._keys(subject, period)
        try:
            # on the connection the releases go through: read after every release written before
            await self._flush()
            found = await self._read_state(keys)
            if int(found[4]) < 0 and period is not None:
                await self._seed_spent(subject, period, keys[3])
                found = await self._read_state(keys)
        except ERRORS as exc:
            self._down(exc)
            raise ServiceUnavailable(UNAVAILABLE) from None
        self._up()
        spent = int(found[4])
        return SubjectState(spent if spent >= 0 else None, int(found[3]), int(found[0]), int(found[1]), int(found[2]))


def _release_arg(grant: Grant, tokens: int, cost: int) -> bytes:
    """A release's argument to ``scripts.SETTLE``: "<lease> <reserved> <second> <token correction>
    <cost> <number of subjects>", as a bulk string."""
    delta = 0 if grant.offline else tokens - grant.tokens
    arg = f"{grant.lease} {grant.cost} {grant.second} {delta} {cost} {len(grant.subjects)}".encode()
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _tallies(subjects: Sequence[Subject], words: Sequence[bytes], start: int) -> list[Tally]:
    """Each subject with its four figures, from ``words[start]`` on."""
    found = []
    for subject in subjects:
        found.append((subject, int(words[start]), int(words[start + 1]), int(words[start + 2]), int(words[start + 3])))
        start += 4
    return found
