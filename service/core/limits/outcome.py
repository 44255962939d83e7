"""What both limiters share: who a request is checked against (``Subject``), what a check found
(``Tally``), and how that becomes the answer: the ``x-ratelimit-*`` headers of the tightest limit,
or a 429 naming the limit hit, with ``retry-after``.

A window is the last 60 whole seconds (the current one included), counted per second: a tally's
requests and tokens are the sums over it, its oldest seconds the earliest still holding some (it
leaves the window first, which is when room comes back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from service.core.errors import TooManyRequests
from service.core.limits.model import Limits, period_at, period_bounds, period_span, usd

WINDOW_SECONDS = 60
BUDGET_RETRY_SECONDS = 1


@dataclass(frozen=True, slots=True)
class Subject:
    """A team or a key a request must pass, with its limits."""

    kind: str  # "team" or "key"
    ident: str
    limits: Limits
    name: str = field(init=False, compare=False, repr=False)
    """The subject's place in a shared store: ``team:team_123``, ``key:key_…``."""
    rpm: tuple[bytes, bytes] | None = field(init=False, compare=False, repr=False)
    tpm: tuple[bytes, bytes] | None = field(init=False, compare=False, repr=False)
    """The requests and tokens per minute limits as their ``x-ratelimit-limit-*`` headers, written once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.kind}:{self.ident}")
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        object.__setattr__(self, "rpm", None if rpm is None else (b"x-ratelimit-limit-requests", b"%d" % rpm))
        object.__setattr__(self, "tpm", None if tpm is None else (b"x-ratelimit-limit-tokens", b"%d" % tpm))

    def period(self, now: float) -> str | None:
        """The budget period ``now`` is in (``2026-11-01``, ``total``), or ``None`` without a budget."""
        if self.limits.budget_micro_usd is None:
            return None
        return period_at(self.limits.budget_period or "month", now)


def periods_at(subjects: Sequence[Subject], now: float) -> tuple[tuple[str | None, ...], float, float]:
    """Each subject's budget period at ``now``, and the span of time (start, end, in seconds since
    the epoch) over which they all stay the same: a limiter works them out once per span."""
    periods: list[str | None] = []
    start, end = -math.inf, math.inf
    for subject in subjects:
        if subject.limits.budget_micro_usd is None:
            periods.append(None)
            continue
        period = subject.limits.budget_period or "month"
        since, until, name = period_span(period, now)
        periods.append(name)
        start, end = max(start, since), min(end, until)
    return tuple(periods), start, end


Tally = tuple[Subject, int, int, int, int]
"""One subject's window after a check (this request included when admitted): the subject, its
requests, its tokens, the oldest second holding a request and the oldest holding tokens (-1: none).
A plain tuple: the memory limiter makes one per subject for every request it admits."""


@dataclass(slots=True)
class Grant:
    """An admitted request: its lease on every subject, to be released once, when it ends."""

    lease: str
    subjects: Sequence[Subject]
    second: int
    """The window second the request was counted in (its tokens are settled there)."""
    tokens: int
    cost: int
    periods: tuple[str | None, ...]
    headers: list[tuple[bytes, bytes]]
    place: Any
    """Where the limiter that made it finds what to release (its figures, or its keys)."""
    released: bool = False
    offline: bool = False
    """Admitted unchecked while the limits' store was unreachable (``LIMITS_FAIL_MODE=open``)."""


@dataclass(frozen=True, slots=True)
class SubjectState:
    """What the team and key API shows beside the limits."""

    spent: int | None
    reserved: int
    requests: int
    tokens: int
    in_flight: int

    def json(self, limits: Limits | None, now: float) -> dict[str, object]:
        budget = limits.budget_micro_usd if limits is not None else None
        start = reset = None
        if budget is not None and limits is not None:
            start, reset = period_bounds(limits.budget_period or "month", datetime.fromtimestamp(now, UTC))
        spent = self.spent if budget is not None else None
        return {
            "spentUsd": usd(spent),
            "reservedUsd": usd(self.reserved),
            "remainingUsd": None if budget is None else usd(max(0, budget - (spent or 0) - self.reserved)),
            "periodStart": _iso(start),
            "resetsAt": _iso(reset),
            "requestsThisMinute": self.requests,
            "tokensThisMinute": self.tokens,
            "inFlight": self.in_flight,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def duration(seconds: float) -> bytes:
    """A reset time as OpenAI writes it (``20ms``, ``1.5s``, ``1m0s``), as a header value, written
    with integer formatting only (a request admitted under a per-minute limit writes one or two)."""
    if seconds < 1:
        return b"%dms" % (seconds * 1000 + 0.5) if seconds > 0 else b"0ms"
    if seconds < WINDOW_SECONDS:
        whole, millis = divmod(round(seconds * 1000), 1000)
        if millis:
            return b"%d.%ss" % (whole, (b"%03d" % millis).rstrip(b"0"))
        return b"%ds" % whole
    minutes, rest = divmod(int(seconds + 0.5), 60)  # half up, as the Redis scripts round
    return b"%dm%ds" % (minutes, rest)


def rate_headers(tallies: Sequence[Tally], now: float) -> list[tuple[bytes, bytes]]:
    """``x-ratelimit-*`` for the tightest requests-per-minute and tokens-per-minute limits."""
    requests = tokens = None
    for subject, counted, tokens_counted, oldest_request, oldest_token in tallies:
        header = subject.rpm
        if header is not None:
            remaining = subject.limits.requests_per_minute - counted  # type: ignore[operator]
            if remaining < 0:  # over (settled above the estimate, or a limit lowered): the first at 0 is named
                remaining = 0
            if requests is None or remaining < requests[1]:
                requests = (header, remaining, oldest_request)
        header = subject.tpm
        if header is not None:
            remaining = subject.limits.tokens_per_minute - tokens_counted  # type: ignore[operator]
            if remaining < 0:
                remaining = 0
            if tokens is None or remaining < tokens[1]:
                tokens = (header, remaining, oldest_token)
    headers: list[tuple[bytes, bytes]] = []
    if requests is not None:
        header, remaining, oldest = requests
        reset = oldest + WINDOW_SECONDS - now
        headers += (
            header,
            (b"x-ratelimit-remaining-requests", b"%d" % remaining),
            (b"x-ratelimit-reset-requests", b"%dms" % (reset * 1000 + 0.5) if 0 < reset < 1 else duration(reset)),
        )
    if tokens is not None:
        header, remaining, oldest = tokens
        reset = oldest + WINDOW_SECONDS - now
        headers += (
            header,
            (b"x-ratelimit-remaining-tokens", b"%d" % remaining),
            (b"x-ratelimit-reset-tokens", b"%dms" % (reset * 1000 + 0.5) if 0 < reset < 1 else duration(reset)),
        )
    return headers


def written_rate_headers(words: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """``rate_headers`` from figures a shared store worked out and wrote (``scripts.ADMIT``): for
    requests, then for tokens, the tightest limit, what is left of it and when it resets (as
    ``duration`` writes it), or ``-`` three times where there is no such limit."""
    headers: list[tuple[bytes, bytes]] = []
    if words[0] != b"-":
        headers += (
            (b"x-ratelimit-limit-requests", words[0]),
            (b"x-ratelimit-remaining-requests", words[1]),
            (b"x-ratelimit-reset-requests", words[2]),
        )
    if words[3] != b"-":
        headers += (
            (b"x-ratelimit-limit-tokens", words[3]),
            (b"x-ratelimit-remaining-tokens", words[4]),
            (b"x-ratelimit-reset-tokens", words[5]),
        )
    return headers


_REQUESTS = frozenset({b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests"})
_TOKENS = frozenset({b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens"})
_BOTH = _REQUESTS | _TOKENS
_RATE_PREFIX = b"x-ratelimit-"
_name = itemgetter(0)


Headers = list[tuple[bytes, bytes]]


def with_rate_headers(headers: Headers, extra: Headers) -> Headers:
    """A response's ``headers`` with the limits' ``x-ratelimit-*`` (``extra``: of requests, tokens or
    both) in place of any upstream ones of the same kind."""
    if b"\n".join(map(_name, headers)).lower().find(_RATE_PREFIX) >= 0:  # not `in`: paths.safe_rest
        names = _BOTH if len(extra) > 3 else _REQUESTS if extra[0][0] in _REQUESTS else _TOKENS
        headers = [(name, value) for name, value in headers if name.lower() not in names]
    headers += extra
    return headers


KINDS = {
    "concurrent": "concurrent requests",
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "budget": "budget",
}


def refusal(
    subject: Subject,
    kind: str,
    retry_after: float,
    tallies: Sequence[Tally],
    now: float,
    *,
    spent: int = 0,
    reserved: int = 0,
) -> TooManyRequests:
    """The 429 for a request refused by ``subject``'s ``kind`` limit."""
    limits = subject.limits
    if kind == "budget":
        budget = limits.budget_micro_usd or 0
        period = limits.budget_period or "month"
        shown = f"${usd(budget):.6f} " + ("in total" if period == "total" else f"per {period}")
        detail = f"{shown}; ${usd(spent):.6f} spent, ${usd(reserved):.6f} reserved by requests in flight"
    else:
        value = {
            "concurrent": limits.max_concurrent,
            "rpm": limits.requests_per_minute,
            "tpm": limits.tokens_per_minute,
        }[kind]
        detail = str(value)
    message = f"Limit reached: {subject.kind} '{subject.ident}' {KINDS[kind]} ({detail})."
    wait = str(max(1, math.ceil(retry_after))).encode()
    return TooManyRequests(message, headers=[(b"retry-after", wait), *rate_headers(tallies, now)])


def budget_retry(subject: Subject, spent: int, cost: int, now: float) -> float:
    """How long a budget refusal asks to wait: until the period resets when what is spent already
    leaves no room; a second when requests in flight hold the room (they may settle lower)."""
    budget = subject.limits.budget_micro_usd or 0
    if spent + cost <= budget:
        return BUDGET_RETRY_SECONDS
    _, reset = period_bounds(subject.limits.budget_period or "month", datetime.fromtimestamp(now, UTC))
    return 86_400.0 if reset is None else reset.timestamp() - now


Estimate = tuple[int, int | None, str | None]
"""A request's worst case before it goes upstream: its prompt in tokens (estimated), what it may
cost at most in micro-dollars (``None`` when the model has no price), and the model it names. A plain
tuple, made for every request under a budget or a tokens-per-minute limit."""
