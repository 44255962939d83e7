"""Limits kept in this process's memory: exact for a gateway of one worker process.

The same semantics as the Redis limiter (``redis_limiter``): a window of 60 one-second buckets per
subject for requests and tokens, leases with an expiry for concurrency and budget reservations, and
the spent amount per budget period, seeded from the usage ledger the first time a period is seen.
Checking every subject and reserving on all of them happens without an ``await`` in between, so
two requests of the same team can never both take the last room.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from service.core.limits.outcome import (
    WINDOW_SECONDS,
    Grant,
    Subject,
    SubjectState,
    Tally,
    budget_retry,
    rate_headers,
    refusal,
)

Seeder = Callable[[Subject, str], Awaitable[int]]
"""What a subject's usage cost in a budget period so far, from the ledger (``period`` = its first day or ``total``)."""


@dataclass(slots=True)
class _Books:
    """One subject's figures."""

    window: dict[int, list[int]] = field(default_factory=dict)
    """Second → [requests, tokens]."""
    leases: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Lease → (expiry, micro-dollars reserved)."""
    reserved: int = 0
    spent: dict[str, int] = field(default_factory=dict)
    """Budget period → micro-dollars settled."""

    def sweep(self, now: float) -> None:
        expired = [lease for lease, (expiry, _) in self.leases.items() if expiry <= now]
        for lease in expired:
            self.reserved -= self.leases.pop(lease)[1]
        first = int(now) - WINDOW_SECONDS + 1
        for second in [s for s in self.window if s < first]:
            del self.window[second]

    def tally(self) -> Tally:
        requests = tokens = 0
        oldest_request = oldest_token = -1
        for second, (r, t) in self.window.items():
            if r:
                requests += r
                oldest_request = second if oldest_request < 0 else min(oldest_request, second)
            if t:
                tokens += t
                oldest_token = second if oldest_token < 0 else min(oldest_token, second)
        return Tally(requests, tokens, oldest_request, oldest_token)


class MemoryLimiter:
    kind = "memory"
    degraded = False

    def __init__(self, seed: Seeder, lease_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.seed = seed
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._books: dict[str, _Books] = {}

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

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        """Count the request against every subject, or raise the 429 of the first limit it would pass."""
        periods = tuple(subject.period(self.clock()) for subject in subjects)
        for subject, period in zip(subjects, periods, strict=True):
            await self._seeded(subject, period)
        now = self.clock()  # from here on, no await: checking and taking are one step
        second = int(now)
        all_books = [self._of(subject) for subject in subjects]
        tallies = []
        for books in all_books:
            books.sweep(now)
            tallies.append(books.tally())
        for subject, books, tally, period in zip(subjects, all_books, tallies, periods, strict=True):
            limits = subject.limits
            if limits.max_concurrent is not None and len(books.leases) >= limits.max_concurrent:
                raise refusal(subject, "concurrent", 1, subjects, tallies, now)
            if limits.requests_per_minute is not None and tally.requests + 1 > limits.requests_per_minute:
                raise refusal(subject, "rpm", tally.oldest_request + WINDOW_SECONDS - now, subjects, tallies, now)
            if limits.tokens_per_minute is not None and tally.tokens + tokens > limits.tokens_per_minute:
                wait = (tally.oldest_token if tally.oldest_token >= 0 else second) + WINDOW_SECONDS - now
                raise refusal(subject, "tpm", wait, subjects, tallies, now)
            if limits.budget_micro_usd is not None and period is not None:
                spent = books.spent.get(period, 0)
                if spent + books.reserved + cost > limits.budget_micro_usd:
                    wait = budget_retry(subject, spent, cost, now)
                    raise refusal(subject, "budget", wait, subjects, tallies, now, spent=spent, reserved=books.reserved)
        after = []
        for books, tally in zip(all_books, tallies, strict=True):
            counts = books.window.setdefault(second, [0, 0])
            counts[0] += 1
            counts[1] += tokens
            books.leases[lease] = (now + self.lease_seconds, cost)
            books.reserved += cost
            after.append(
                Tally(
                    tally.requests + 1,
                    tally.tokens + tokens,
                    tally.oldest_request if tally.oldest_request >= 0 else second,
                    tally.oldest_token if tally.oldest_token >= 0 else second,
                )
            )
        return Grant(lease, subjects, second, tokens, cost, periods, rate_headers(subjects, after, now))

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """The request ended: its lease goes, its real cost is spent, its tokens settle to the real count."""
        if grant.released:
            return
        grant.released = True
        for subject, period in zip(grant.subjects, grant.periods, strict=True):
            books = self._of(subject)
            held = books.leases.pop(grant.lease, None)
            if held is not None:
                books.reserved -= held[1]
            if period is not None and period in books.spent:
                books.spent[period] += cost
            counts = books.window.get(grant.second)
            if counts is not None:
                counts[1] += tokens - grant.tokens

    def spend(self, subjects: Sequence[Subject], cost: int) -> None:
        """Only for the Redis limiter's outages; in memory every request has a grant."""

    async def state(self, subject: Subject) -> SubjectState:
        period = subject.period(self.clock())
        await self._seeded(subject, period)
        books = self._of(subject)
        books.sweep(self.clock())
        tally = books.tally()
        spent = books.spent.get(period) if period is not None else None
        return SubjectState(spent, books.reserved, tally.requests, tally.tokens, len(books.leases))
