"""What the console's pages show, read through the same store calls and report helpers as the JSON
API (``service.usage``), so a figure on a page equals what ``GET /usage`` answers for it.

Keys and teams are listed from the key store in pages of ``SCAN_PAGE``, at most ``MAX_SCANNED``
keys per view (a page says when it stopped there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from config import Settings
from service.core.errors import BadRequest
from service.core.store import TokenRecord, TokenStore
from service.tokens import whole_number
from service.usage import build_report, timestamp

SCAN_PAGE = 500
MAX_SCANNED = 10_000
IDLE_DAYS = 30
CHART_DAYS = 30


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


def expires_at(record: TokenRecord) -> str | None:
    """When the key expires. Extension point: keys carry no expiry until key governance lands."""
    value = getattr(record, "expires_at", None)
    return value if isinstance(value, str) else None


def allowed(record: TokenRecord) -> str | None:
    """The key's allow-lists, shown as text. Extension point, as ``expires_at``."""
    lists = [getattr(record, name, None) for name in ("allowed_models", "allowed_providers")]
    shown = [", ".join(value) for value in lists if isinstance(value, list | tuple) and value]
    return "; ".join(shown) or None


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
    expiry = expires_at(record)
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
    """Extension point: Redis is shown once the limits (``REDIS_URL``) are on this gateway."""
    return "configured" if getattr(settings, "redis_url", None) else "not configured"
