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

from service.core.errors import TooManyRequests
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

    def sweep(self, now: float) -> None:
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
        first = int(now) - WINDOW_SECONDS + 1
        while seconds and seconds[0][0] < first:
            _, requests, tokens = seconds.popleft()
            self.requests -= requests
            self.tokens -= tokens

    def count(self, second: int, tokens: int) -> None:
        seconds = self.seconds
        if seconds and seconds[-1][0] == second:
            counts = seconds[-1]
            counts[1] += 1
            counts[2] += tokens
        else:
            seconds.append([second, 1, tokens])
        self.requests += 1
        self.tokens += tokens

    def settle(self, second: int, delta: int) -> None:
        """Correct the tokens counted in ``second``, while it is in the window."""
        for counts in reversed(self.seconds):
            if counts[0] == second:
                counts[2] += delta
                self.tokens += delta
                return
            if counts[0] < second:
                return

    def tally(self) -> Tally:
        seconds = self.seconds
        if not seconds:
            return Tally(0, 0, -1, -1)
        oldest_token = next((counts[0] for counts in seconds if counts[2]), -1)
        return Tally(self.requests, self.tokens, seconds[0][0], oldest_token)


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
        now = self.clock()
        periods = tuple(subject.period(now) for subject in subjects)
        all_books = [self._of(subject) for subject in subjects]
        unseeded = [(s, p) for s, b, p in zip(subjects, all_books, periods, strict=True) if p and p not in b.spent]
        if unseeded:
            for first_use, its_period in unseeded:
                await self._seeded(first_use, its_period)
            now = self.clock()
        # from here on, no await: checking and taking are one step
        for books in all_books:
            books.sweep(now)
        for subject, books, period in zip(subjects, all_books, periods, strict=True):
            limits = subject.limits
            if limits.max_concurrent is not None and len(books.leases) >= limits.max_concurrent:
                raise self._refusal(subject, "concurrent", 1, subjects, all_books, now)
            if limits.requests_per_minute is not None and books.requests + 1 > limits.requests_per_minute:
                wait = books.seconds[0][0] + WINDOW_SECONDS - now
                raise self._refusal(subject, "rpm", wait, subjects, all_books, now)
            if limits.tokens_per_minute is not None and books.tokens + tokens > limits.tokens_per_minute:
                oldest = books.tally().oldest_token
                wait = (oldest if oldest >= 0 else int(now)) + WINDOW_SECONDS - now
                raise self._refusal(subject, "tpm", wait, subjects, all_books, now)
            if limits.budget_micro_usd is not None and period is not None:
                spent = books.spent.get(period, 0)
                if spent + books.reserved + cost > limits.budget_micro_usd:
                    wait = budget_retry(subject, spent, cost, now)
                    raise self._refusal(subject, "budget", wait, subjects, all_books, now, spent, books.reserved)
        second = int(now)
        held = (now + self.lease_seconds, cost)
        for books in all_books:
            books.count(second, tokens)
            books.leases[lease] = held
            books.reserved += cost
        headers = rate_headers(subjects, [books.tally() for books in all_books], now)
        return Grant(lease, subjects, second, tokens, cost, periods, headers)

    @staticmethod
    def _refusal(
        subject: Subject,
        kind: str,
        wait: float,
        subjects: Sequence[Subject],
        all_books: Sequence[_Books],
        now: float,
        spent: int = 0,
        reserved: int = 0,
    ) -> TooManyRequests:
        tallies = [books.tally() for books in all_books]
        return refusal(subject, kind, wait, subjects, tallies, now, spent=spent, reserved=reserved)

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """The request ended: its lease goes, its real cost is spent, its tokens settle to the real count."""
        if grant.released:
            return
        grant.released = True
        delta = tokens - grant.tokens
        for subject, period in zip(grant.subjects, grant.periods, strict=True):
            books = self._of(subject)
            held = books.leases.pop(grant.lease, None)
            if held is not None:
                books.reserved -= held[1]
            if period is not None and period in books.spent:
                books.spent[period] += cost
            if delta:
                books.settle(grant.second, delta)

    async def state(self, subject: Subject) -> SubjectState:
        period = subject.period(self.clock())
        await self._seeded(subject, period)
        books = self._of(subject)
        books.sweep(self.clock())
        spent = books.spent.get(period) if period is not None else None
        return SubjectState(spent, books.reserved, books.requests, books.tokens, len(books.leases))
