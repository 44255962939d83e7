"""What limits a team or a key carries, and the calendar periods budgets run over.

Money is whole micro-dollars everywhere (1 USD = 1,000,000), as in the usage ledger; the API shows
dollars. Periods are calendar UTC: a day from midnight, an ISO week from Monday, a month from the
1st, or ``total`` (never resets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal

PERIODS = ("day", "week", "month", "total")
MICRO = 1_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    """One team's or key's limits; ``None`` for a limit not set."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    budget_micro_usd: int | None = None
    budget_period: str | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, item.name) is None for item in fields(self))

    @classmethod
    def from_row(cls, values: tuple[object, ...]) -> Limits | None:
        """From the five stored columns (rpm, tpm, concurrent, budget, period); ``None`` when none is set."""
        rpm, tpm, concurrent, budget, period = values
        found = cls(
            None if rpm is None else int(str(rpm)),
            None if tpm is None else int(str(tpm)),
            None if concurrent is None else int(str(concurrent)),
            None if budget is None else int(str(budget)),
            None if period is None else str(period),
        )
        return None if found.empty else found

    def row(self) -> tuple[int | str | None, ...]:
        return (
            self.requests_per_minute,
            self.tokens_per_minute,
            self.max_concurrent,
            self.budget_micro_usd,
            self.budget_period,
        )

    def json(self) -> dict[str, object]:
        return {
            "requestsPerMinute": self.requests_per_minute,
            "tokensPerMinute": self.tokens_per_minute,
            "maxConcurrent": self.max_concurrent,
            "budgetUsd": usd(self.budget_micro_usd),
            "budgetPeriod": self.budget_period,
        }


NO_LIMITS = Limits()


def usd(micro: int | None) -> float | None:
    """Micro-dollars as dollars, written from the integer (six decimals at most, never a rounding drift)."""
    return None if micro is None else float(Decimal(micro) / MICRO)


def period_bounds(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """The start of the period ``now`` is in and when the next starts (``None``, ``None`` for ``total``)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        following = (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
        return start, following
    return None, None


def period_key(period: str, now: datetime) -> str:
    """The name of the period ``now`` is in: its first day (``2026-11-01``), or ``total``."""
    start, _ = period_bounds(period, now)
    return "total" if start is None else start.date().isoformat()


_CURRENT: dict[str, tuple[float, float, str]] = {}
"""Per kind of period, the one last asked for: (its start, its end, in seconds since the epoch; its name)."""


def period_span(period: str, now: float) -> tuple[float, float, str]:
    """The period ``now`` (seconds since the epoch) is in: its start and its end in seconds since
    the epoch (infinite for ``total``) and its name as ``period_key`` gives it; worked out once per
    period (every request under a budget asks)."""
    found = _CURRENT.get(period)
    if found is not None and found[0] <= now < found[1]:
        return found
    start, end = period_bounds(period, datetime.fromtimestamp(now, UTC))
    found = _CURRENT[period] = (
        -math.inf if start is None else start.timestamp(),
        math.inf if end is None else end.timestamp(),
        "total" if start is None else start.date().isoformat(),
    )
    return found


def period_at(period: str, now: float) -> str:
    """``period_key`` at ``now`` in seconds since the epoch."""
    return period_span(period, now)[2]


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")
