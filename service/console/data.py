"""What the console's pages show, read through the same store calls and report helpers as the JSON
API (``service.usage``), so a figure on a page equals what ``GET /usage`` answers for it.

Keys and teams are listed from the key store in pages of ``SCAN_PAGE``, at most ``MAX_SCANNED``
keys per view (a page says when it stopped there). Limits and their figures (spent, reserved, in
flight) come from the store and the limiter through the same calls as ``GET /teams/{teamId}``, so a
budget bar shows the ``spentUsd`` the API answers.
"""

from __future__ import annotations

import json
import re
import time as clock
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from config import Settings
from service.core.errors import BadRequest, ServiceUnavailable
from service.core.limits.limiter import Limiter
from service.core.limits.model import MICRO, NO_LIMITS, Limits, usd
from service.core.limits.outcome import Subject, SubjectState
from service.core.store import TokenRecord, TokenStore
from service.core.store.base import TeamSummary as StoredTeam
from service.teams_api import LIMIT_FIELDS
from service.tokens import whole_number
from service.usage import build_report, timestamp

SCAN_PAGE = 500
MAX_SCANNED = 10_000
IDLE_DAYS = 30
CHART_DAYS = 30
NEAREST_BUDGETS = 10
ALLOW_LISTS = ("allowedModels", "allowedProviders")
_SEPARATORS = re.compile(r"[,\s]+")


def midnight(day: date) -> str:
    return timestamp(datetime.combine(day, time(), UTC))


def days(first: date, count: int) -> list[str]:
    return [(first + timedelta(days=n)).isoformat() for n in range(count)]


async def scan_keys(store: TokenStore, team_id: str | None = None) -> tuple[list[TokenRecord], bool]:
    """Every key (of one team), in creation order, up to ``MAX_SCANNED``; and whether it stopped there."""
    found: list[TokenRecord] = []
    after: tuple[str, str] | None = None
    while len(found) < MAX_SCANNED:
        page = await store.list(SCAN_PAGE, after, team_id)
        found.extend(record for record, _ in page)
        if len(page) < SCAN_PAGE:
            return found, False
        after = (page[-1][0].created_at, page[-1][1])
    return found, True


def allowed(item: TokenRecord | StoredTeam) -> str | None:
    """A key's or team's allow-lists as text (``None``: neither list is set, anything is allowed)."""
    lists = [("models", item.allowed_models), ("providers", item.allowed_providers)]
    shown = [f"{label}: {', '.join(value) or 'none'}" for label, value in lists if value is not None]
    return "; ".join(shown) or None


def json_number(raw: str) -> object:
    """A form field read as JSON reads a number (``"60"`` is 60); anything else stays text, for the
    API's checks to refuse with their own message."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, int | float) else raw


def list_field(raw: str) -> list[str] | None:
    """An allow-list typed into a form as the JSON list the API takes: entries separated by commas,
    spaces or new lines; an empty field is ``null`` (no list). The API's checks judge the entries."""
    return [item for item in _SEPARATORS.split(raw) if item] or None


def key_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The key creation form as the JSON body of ``POST /tokens``: an empty field is left out."""
    body: dict[str, Any] = {}
    for name in ("teamId", "name", "expiresIn"):
        if value := form.get(name, "").strip():
            body[name] = value
    body.setdefault("teamId", "")
    for name in ALLOW_LISTS:
        if (items := list_field(form.get(name, ""))) is not None:
            body[name] = items
    return body


def allow_lists_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The allow-lists form as the JSON body of ``PATCH /teams/{teamId}`` (or ``/keys/{keyId}``):
    both lists, an empty field ``null`` (the list cleared)."""
    return {name: list_field(form.get(name, "")) for name in ALLOW_LISTS}


def allow_lists_values(item: TokenRecord | StoredTeam | None) -> dict[str, str]:
    """A key's or team's allow-lists as the form shows them (empty: no list)."""
    models, providers = (None, None) if item is None else (item.allowed_models, item.allowed_providers)
    return {"allowedModels": ", ".join(models or ()), "allowedProviders": ", ".join(providers or ())}


@dataclass(frozen=True, slots=True)
class KeyView:
    record: TokenRecord
    expires_at: str | None
    expired: bool
    idle: bool
    allowed: str | None = None


def key_view(record: TokenRecord, now: datetime) -> KeyView:
    """A key with what the filters look at: expired (past ``expiresAt``), idle (neither used nor
    created in the last ``IDLE_DAYS`` days)."""
    expiry = record.expires_at
    now_text = timestamp(now)
    idle_since = timestamp(now - timedelta(days=IDLE_DAYS))
    return KeyView(
        record,
        expiry,
        expired=expiry is not None and expiry <= now_text,
        idle=(record.last_used_at or record.created_at) < idle_since,
        allowed=allowed(record),
    )


@dataclass
class TeamSummary:
    team_id: str
    names: list[str] = field(default_factory=list)
    keys: int = 0
    last_used_at: str | None = None


def team_summaries(records: Sequence[TokenRecord]) -> list[TeamSummary]:
    """Teams that have keys, by team id: key count, key names, last use."""
    teams: dict[str, TeamSummary] = {}
    for record in records:
        team = teams.setdefault(record.team_id, TeamSummary(record.team_id))
        team.keys += 1
        if record.name not in team.names and len(team.names) < 3:
            team.names.append(record.name)
        if record.last_used_at and (team.last_used_at is None or record.last_used_at > team.last_used_at):
            team.last_used_at = record.last_used_at
    return [teams[team_id] for team_id in sorted(teams)]


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    requests: int
    incomplete: int

    @property
    def kind(self) -> str:
        if self.status in (502, 503, 504):
            return "upstream failure"
        if self.status >= 400:
            return "error"
        return "cut short"


@dataclass(frozen=True, slots=True)
class Overview:
    today: Mapping[str, object]
    month: Mapping[str, object]
    today_range: tuple[str, str]
    month_range: tuple[str, str]
    chart_days: list[str]
    by_provider: list[dict[str, object]]
    by_team: list[dict[str, object]]
    failures: list[Failure]
    failures_since: str


async def overview(store: TokenStore, now: datetime) -> Overview:
    """Today and this month (UTC, as ``GET /usage?from=…&to=…`` with whole days), 30 days by provider
    and by team, and the last hour's failed or cut-short requests from the ledger."""
    today = now.astimezone(UTC).date()
    tomorrow = today + timedelta(days=1)
    first = tomorrow - timedelta(days=CHART_DAYS)
    today_range = (midnight(today), midnight(tomorrow))
    month_range = (midnight(today.replace(day=1)), midnight(tomorrow))
    no_filter: dict[str, str] = {}
    today_report: dict[str, Any] = await build_report(store, *today_range, ["day"], no_filter)
    month_report: dict[str, Any] = await build_report(store, *month_range, ["day"], no_filter)
    window = (midnight(first), midnight(tomorrow))
    since = timestamp(now - timedelta(hours=1))
    failures = await store.usage_failures(since, timestamp(now + timedelta(minutes=1)))
    return Overview(
        today=today_report["totals"],
        month=month_report["totals"],
        today_range=today_range,
        month_range=month_range,
        chart_days=days(first, CHART_DAYS),
        by_provider=await store.usage_report(*window, ["day", "provider"], no_filter),
        by_team=await store.usage_report(*window, ["day", "team"], no_filter),
        failures=[Failure(*row) for row in failures],
        failures_since=since,
    )


def whole_page(raw: str) -> int:
    page = whole_number(raw)
    if page is None or not 1 <= page <= MAX_SCANNED:
        raise BadRequest(f"'page' must be a whole number from 1 to {MAX_SCANNED}.")
    return page


def redis_status(settings: Settings) -> str:
    return "configured (limits shared by every process)" if settings.redis_url else "not configured"


# -- limits and budgets -----------------------------------------------------------------------------


def dollars(micro: int) -> str:
    """Micro-dollars as a price: ``$10.00``, ``$0.000125``."""
    if micro % 10_000 == 0:
        return f"${micro / MICRO:,.2f}"
    return f"${Decimal(micro) / MICRO:,f}"


def limits_text(limits: Limits | None) -> str:
    """A team's or key's limits in a few words (``none`` when none is set)."""
    if limits is None or limits.empty:
        return "none"
    parts = []
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute:,} requests/min")
    if limits.tokens_per_minute is not None:
        parts.append(f"{limits.tokens_per_minute:,} tokens/min")
    if limits.max_concurrent is not None:
        parts.append(f"{limits.max_concurrent:,} at once")
    if limits.budget_micro_usd is not None:
        period = limits.budget_period or "month"
        parts.append(f"{dollars(limits.budget_micro_usd)} {'in total' if period == 'total' else 'a ' + period}")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Standing:
    """A team's or key's limits and where it stands against them; ``state`` is ``None`` while the
    limits' store (Redis) cannot be reached."""

    ident: str
    limits: Limits | None
    state: SubjectState | None
    figures: Mapping[str, object] | None
    """The state as ``GET /teams/{teamId}`` shows it (``spentUsd``, ``resetsAt``, …)."""

    @property
    def text(self) -> str:
        return limits_text(self.limits)

    @property
    def budget(self) -> int | None:
        return None if self.limits is None else self.limits.budget_micro_usd

    @property
    def spent(self) -> int | None:
        return None if self.budget is None or self.state is None else self.state.spent

    @property
    def share(self) -> float:
        """Spent over budget (0 without figures; a spent budget of 0 counts as full)."""
        if self.budget is None or self.spent is None:
            return 0.0
        return self.spent / self.budget if self.budget else 1.0

    @property
    def meter(self) -> dict[str, object]:
        """The budget bar's ``<meter>`` values, in dollars: ``value`` is the API's ``spentUsd``."""
        budget = usd(self.budget) or 0.0
        return {"max": budget, "value": usd(self.spent) or 0.0, "high": budget * 0.8, "optimum": 0}


async def standing(limiter: Limiter, kind: str, ident: str, limits: Limits | None) -> Standing:
    """As ``GET /teams/{teamId}`` and ``GET /keys/{keyId}`` read it: the limiter's figures now."""
    try:
        state = await limiter.state(Subject(kind, ident, limits or NO_LIMITS))
    except ServiceUnavailable:
        return Standing(ident, limits, None, None)
    return Standing(ident, limits, state, state.json(limits, clock.time()))


async def team_standings(store: TokenStore, limiter: Limiter) -> tuple[dict[str, Standing], bool]:
    """Every team with limits set, by team id (up to ``MAX_SCANNED`` teams read); and whether it
    stopped there."""
    found: dict[str, Standing] = {}
    after: str | None = None
    for _ in range(MAX_SCANNED // SCAN_PAGE):
        page = await store.teams(SCAN_PAGE, after)
        for team in page:
            if team.limits is not None and not team.limits.empty:
                found[team.team_id] = await standing(limiter, "team", team.team_id, team.limits)
        if len(page) < SCAN_PAGE:
            return found, False
        after = page[-1].team_id
    return found, True


def nearest_budgets(standings: Mapping[str, Standing]) -> list[Standing]:
    """The teams with a budget, the most spent (against their budget) first."""
    budgeted = [item for item in standings.values() if item.budget is not None]
    return sorted(budgeted, key=lambda item: (-item.share, item.ident))[:NEAREST_BUDGETS]


def limits_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The limits form as the JSON body of ``PATCH /teams/{teamId}``, ``{"limits": {…}}``: an empty
    field is ``null`` (cleared); a number is read as JSON reads it, anything else is passed on as
    text for the API's checks to refuse with their own message."""
    limits: dict[str, object] = {}
    for name in LIMIT_FIELDS:
        raw = form.get(name, "").strip()
        if not raw:
            limits[name] = None
        elif name == "budgetPeriod":
            limits[name] = raw
        else:
            try:
                limits[name] = json.loads(raw)
            except ValueError:
                limits[name] = raw
    return {"limits": limits}


TEAM_FORMS = {"limits": limits_form, "allow-lists": allow_lists_form}
"""The forms of a team's page, told apart by their hidden ``form`` field."""
