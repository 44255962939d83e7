"""Limits kept in this process's memory: exact for a gateway of one worker process.

The same semantics as the Redis limiter (``redis_limiter``): a window of 60 one-second buckets per
subject for requests and tokens, leases with an expiry for concurrency and budget reservations, and
the spent amount per budget period, seeded from the usage ledger the first time a period is seen.
Checking every subject and reserving on all of them happens without an ``await`` in between, so
two requests of the same team can never both take the last room.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from service.core.errors import TooManyRequests
from service.core.limits.outcome import (
    WINDOW_SECONDS,
    Grant,
    Subject,
    SubjectState,
    Tally,
    budget_retry,
    periods_at,
    rate_headers,
    refusal,
)

Seeder = Callable[[Subject, str], Awaitable[int]]
"""What a subject's usage cost in a budget period so far, from the ledger (``period`` = its first day or ``total``)."""


class _Books:
    """One subject's figures."""

    __slots__ = ("leases", "requests", "reserved", "seconds", "spent", "tokens")

    def __init__(self) -> None:
        self.seconds: deque[list[int]] = deque()
        """The window's seconds that hold a request, oldest first: [second, requests, tokens]."""
        self.requests = 0
        self.tokens = 0
        """The window's sums."""
        self.leases: dict[str, tuple[float, int]] = {}
        """Lease → (expiry, micro-dollars reserved), in the order they were taken, which is the order
        they expire in (every lease lives as long)."""
        self.reserved = 0
        self.spent: dict[str, int] = {}
        """Budget period → micro-dollars settled."""

    def sweep(self, now: float, first: int) -> None:
        """Drop the leases expired at ``now`` and the seconds before ``first``."""
        leases = self.leases
        if leases:
            expired = []
            for lease, (expiry, _) in leases.items():
                if expiry > now:
                    break
                expired.append(lease)
            for lease in expired:
                self.reserved -= leases.pop(lease)[1]
        seconds = self.seconds
        while seconds and seconds[0][0] < first:
            _, requests, tokens = seconds.popleft()
            self.requests -= requests
            self.tokens -= tokens

    def settle(self, second: int, delta: int) -> None:
        """Correct the tokens counted in ``second``, while it is in the window."""
        for counts in reversed(self.seconds):
            if counts[0] == second:
                counts[2] += delta
                self.tokens += delta
                return
            if counts[0] < second:
                return

    def oldest_token(self) -> int:
        return next((counts[0] for counts in self.seconds if counts[2]), -1)

    def tally(self, subject: Subject) -> Tally:
        seconds = self.seconds
        if not seconds:
            return (subject, 0, 0, -1, -1)
        return (subject, self.requests, self.tokens, seconds[0][0], self.oldest_token())


class _Group(NamedTuple):
    """A request's subjects with their figures and budget periods, valid from ``start`` to ``end``
    (seconds since the epoch): kept per subjects tuple (the limits gate keeps one per key)."""

    subjects: Sequence[Subject]
    entries: tuple[tuple[Subject, _Books, str | None], ...]
    periods: tuple[str | None, ...]
    start: float
    end: float
    rated: bool
    """Whether a subject has a requests or a tokens per minute limit (the response says how much is left)."""


_GROUPS_KEPT = 10_000


class MemoryLimiter:
    kind = "memory"
    degraded = False

    def __init__(self, seed: Seeder, lease_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.seed = seed
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._books: dict[str, _Books] = {}
        self._groups: dict[int, _Group] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _of(self, subject: Subject) -> _Books:
        books = self._books.get(subject.name)
        if books is None:
            books = self._books[subject.name] = _Books()
        return books

    async def _seeded(self, subject: Subject, period: str | None) -> None:
        if period is not None and period not in self._of(subject).spent:
            found = await self.seed(subject, period)
            books = self._of(subject)
            if period not in books.spent:  # another request may have seeded it meanwhile
                books.spent = {period: found}  # only the current period is kept

    def _group(self, subjects: Sequence[Subject], now: float) -> _Group:
        periods, start, end = periods_at(subjects, now)
        entries = tuple((subject, self._of(subject), period) for subject, period in zip(subjects, periods, strict=True))
        rated = any(subject.rpm is not None or subject.tpm is not None for subject in subjects)
        if len(self._groups) >= _GROUPS_KEPT:
            self._groups.clear()
        group = self._groups[id(subjects)] = _Group(subjects, entries, periods, start, end, rated)
        return group

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        """Count the request against every subject, or raise the 429 of the first limit it would pass."""
        now = self.clock()
        group = self._groups.get(id(subjects))
        if group is None or group.subjects is not subjects or not group.start <= now < group.end:
            group = self._group(subjects, now)
        entries = group.entries
        for _, books, period in entries:
            if period is not None and period not in books.spent:
                for first_use, _, its_period in entries:
                    await self._seeded(first_use, its_period)
                now = self.clock()
                break
        # from here on, no await: checking and taking are one step
        first = int(now) - WINDOW_SECONDS + 1
        for _, books, _ in entries:  # all first: a refusal's headers tell of every subject
            if books.leases or (books.seconds and books.seconds[0][0] < first):
                books.sweep(now, first)
        for subject, books, period in entries:
            limits = subject.limits
            if limits.max_concurrent is not None and len(books.leases) >= limits.max_concurrent:
                raise self._refusal(subject, "concurrent", 1, entries, now)
            if limits.requests_per_minute is not None and books.requests + 1 > limits.requests_per_minute:
                wait = books.seconds[0][0] + WINDOW_SECONDS - now
                raise self._refusal(subject, "rpm", wait, entries, now)
            if limits.tokens_per_minute is not None and books.tokens + tokens > limits.tokens_per_minute:
                oldest = books.oldest_token()
                wait = (oldest if oldest >= 0 else int(now)) + WINDOW_SECONDS - now
                raise self._refusal(subject, "tpm", wait, entries, now)
            if limits.budget_micro_usd is not None and period is not None:
                spent = books.spent.get(period, 0)
                # what reserves nothing spends nothing: never refused by a budget, spent or not
                if cost and spent + books.reserved + cost > limits.budget_micro_usd:
                    wait = budget_retry(subject, spent, cost, now)
                    raise self._refusal(subject, "budget", wait, entries, now, spent, books.reserved)
        second = int(now)
        held = (now + self.lease_seconds, cost)
        tallies: list[Tally] = []
        for subject, books, _ in entries:
            seconds = books.seconds
            if seconds and seconds[-1][0] == second:
                counts = seconds[-1]
                counts[1] += 1
                counts[2] += tokens
            else:
                seconds.append([second, 1, tokens])
            books.requests += 1
            books.tokens += tokens
            books.leases[lease] = held
            books.reserved += cost
            if group.rated:
                oldest_token = books.oldest_token() if subject.tpm is not None else -1
                tallies.append((subject, books.requests, books.tokens, seconds[0][0], oldest_token))
        headers = rate_headers(tallies, now) if tallies else []
        return Grant(lease, subjects, second, tokens, cost, group.periods, headers, entries)

    @staticmethod
    def _refusal(
        subject: Subject,
        kind: str,
        wait: float,
        entries: Sequence[tuple[Subject, _Books, str | None]],
        now: float,
        spent: int = 0,
        reserved: int = 0,
    ) -> TooManyRequests:
        tallies = [books.tally(each) for each, books, _ in entries]
        return refusal(subject, kind, wait, tallies, now, spent=spent, reserved=reserved)

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """The request ended: its lease goes, its real cost is spent, its tokens settle to the real count."""
        if grant.released:
            return
        grant.released = True
        delta = tokens - grant.tokens
        lease = grant.lease
        entries: tuple[tuple[Subject, _Books, str | None], ...] = grant.place
        for _, books, period in entries:
            held = books.leases.pop(lease, None)
            if held is not None:
                books.reserved -= held[1]
            if period is not None:
                spent = books.spent
                if period in spent:
                    spent[period] += cost
            if delta:
                books.settle(grant.second, delta)

    async def state(self, subject: Subject) -> SubjectState:
        period = subject.period(self.clock())
        await self._seeded(subject, period)
        books = self._of(subject)
        now = self.clock()
        books.sweep(now, int(now) - WINDOW_SECONDS + 1)
        spent = books.spent.get(period) if period is not None else None
        return SubjectState(spent, books.reserved, books.requests, books.tokens, len(books.leases))
