"""Usage and cost, read from the usage ledger.

- ``GET /usage`` (admin): totals over a time range, grouped by ``hour``, ``day``, ``team``, ``key``,
  ``provider`` and ``model`` (``groupBy``, default ``day``), filtered on ``teamId``, ``keyId``,
  ``provider`` and ``model``; JSON, or CSV with ``format=csv``;
- ``GET /usage/requests/{requestId}`` (admin): one request's ledger row;
- ``GET /tokens/{apiKey}/usage``: the key's own usage by day and model (holding the key is the
  authority, as for ``GET /tokens/{apiKey}``).

Ranges are ``from`` (included) to ``to`` (excluded), dates (``2026-11-01``) or times
(``2026-11-01T12:00:00Z``, at most milliseconds); by default the 30 UTC days ending with today. Costs
are exact: the store sums integers of micro-dollars, shown in dollars with six decimals written from
that integer (never through a float); ``null`` when nothing in the row had a price.

The CLI (``gateway usage``) builds the same reports with the helpers here.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from service.core.errors import BadRequest, NotFound
from service.core.ledger import LedgerRow
from service.core.store import StoreUnavailableError, TokenStore
from service.core.store.usage import GROUPS
from service.core.teams import TeamDirectory
from service.tokens import MAX_NAME, MAX_TEAM_ID, NOT_FOUND_MESSAGE, check_text, require_admin, route

DEFAULT_DAYS = 30
MAX_DAYS = 400
DEFAULT_GROUPS = ("day",)
KEY_GROUPS = ("day", "model")
REQUEST_NOT_FOUND_MESSAGE = "Request not found"
MAX_REQUEST_ID = 256
FILTERS = {
    "teamId": ("team_id", MAX_TEAM_ID),
    "keyId": ("key_id", MAX_TEAM_ID),
    "provider": ("provider", MAX_NAME),
    "model": ("model", MAX_NAME),
}
"""Query parameter → (the store's filter, the longest value accepted)."""
SUM_FIELDS = ("requests", "inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens")
GROUP_FIELDS = {name: group.field for name, group in GROUPS.items()}
TIME_FORMS = "a date like 2026-11-01 or a UTC time like 2026-11-01T12:00:00Z"
_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,3})?)?(Z|[+-][0-9]{2}:[0-9]{2}))?"
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet would read as the start of a formula in a CSV cell."""


def parse_time(raw: str, field: str) -> datetime:
    """``raw`` as a UTC time: a date (its midnight) or a time with ``Z`` or an offset, in ASCII
    digits, at most milliseconds; a ``BadRequest`` naming ``field`` otherwise."""
    if not _TIME.fullmatch(raw):
        raise BadRequest(f"'{field}' must be {TIME_FORMS}.")
    try:
        value = datetime.fromisoformat(raw)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"'{field}' must be {TIME_FORMS}.") from None


def timestamp(value: datetime) -> str:
    """A UTC time as the ledger writes times: ``2026-11-01T12:00:00.000Z``."""
    value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:"
        f"{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def time_range(
    start: datetime | None, end: datetime | None, now: datetime | None = None, names: tuple[str, str] = ("from", "to")
) -> tuple[str, str]:
    """The range a report covers, as ledger times. Without ``end``: the end of today (UTC), so
    everything up to now; without ``start``: ``DEFAULT_DAYS`` before the end. Whole days are read
    from the daily totals, which is why the defaults are whole days. Messages name the bounds ``names``."""
    first, last = names
    try:
        if end is None:
            today = (now or datetime.now(UTC)).astimezone(UTC).date()
            end = datetime.combine(today + timedelta(days=1), time(), UTC)
        if start is None:
            start = end - timedelta(days=DEFAULT_DAYS)
    except OverflowError:  # the default start would fall before the year 1
        raise BadRequest(
            f"'{last}' is too early for a range of {DEFAULT_DAYS} days before it; give '{first}' too."
        ) from None
    if start > end:
        raise BadRequest(f"'{first}' must not be after '{last}'.")
    if end - start > timedelta(days=MAX_DAYS):
        raise BadRequest(f"The range from '{first}' to '{last}' must be at most {MAX_DAYS} days.")
    return timestamp(start), timestamp(end)


def parse_group_by(raw: str | None, field: str = "groupBy") -> list[str]:
    """``groupBy``: comma-separated names from ``GROUPS``, each once; ``day`` when absent."""
    if raw is None:
        return list(DEFAULT_GROUPS)
    names = [part.strip(" ") for part in raw.split(",")]
    allowed = ", ".join(GROUPS)
    if not all(names):
        raise BadRequest(f"'{field}' must list one or more of {allowed}, separated by commas.")
    for name in names:
        if name not in GROUPS:
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise BadRequest(f"'{field}' cannot be {shown!r}: use {allowed}.")
    return list(dict.fromkeys(names))


def check_filters(values: Mapping[str, str | None]) -> dict[str, str]:
    """The store's filters for the given ``teamId``, ``keyId``, ``provider`` and ``model``
    (``None``: not filtered), each checked as the token API checks a team id."""
    filters: dict[str, str] = {}
    for name, (column, limit) in FILTERS.items():
        value = values.get(name)
        if value is not None:
            filters[column] = check_text(value, name, limit)
    return filters


def usd(micro_usd: int) -> str:
    """Micro-dollars as dollars with six decimals, from the integer: ``1234`` → ``0.001234``."""
    sign = "-" if micro_usd < 0 else ""
    whole, fraction = divmod(abs(micro_usd), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def totals(rows: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The sums over report rows; ``costMicroUsd`` ``None`` when no row had a priced request."""
    result: dict[str, object] = {field: sum(_int(row[field]) for row in rows) for field in SUM_FIELDS}
    costs = [_int(row["costMicroUsd"]) for row in rows if row["costMicroUsd"] is not None]
    result["costMicroUsd"] = sum(costs) if costs else None
    result["unpricedRequests"] = sum(_int(row["unpricedRequests"]) for row in rows)
    return result


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


async def build_report(
    store: TokenStore, start: str, end: str, group_by: Sequence[str], filters: Mapping[str, str]
) -> dict[str, Any]:
    """A report as the API shows it, costs still in micro-dollars (``costMicroUsd``)."""
    rows = await store.usage_report(start, end, group_by, filters)
    return {"from": start, "to": end, "groupBy": list(group_by), "rows": rows, "totals": totals(rows)}


def _cost(micro_usd: object) -> orjson.Fragment | None:
    return None if micro_usd is None else orjson.Fragment(usd(_int(micro_usd)))


def in_dollars(row: Mapping[str, object]) -> dict[str, object]:
    """A report row or totals for JSON: ``costMicroUsd`` becomes ``costUsd``, an exact number of
    dollars (written as the decimal it is), in the same place."""
    return {("costUsd" if k == "costMicroUsd" else k): (_cost(v) if k == "costMicroUsd" else v) for k, v in row.items()}


def report_json(report: Mapping[str, Any], option: int = 0) -> bytes:
    return orjson.dumps(
        {
            "from": report["from"],
            "to": report["to"],
            "groupBy": report["groupBy"],
            "rows": [in_dollars(row) for row in report["rows"]],
            "totals": in_dollars(report["totals"]),
        },
        option=option,
    )


def _cell(value: object) -> str:
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text  # never a formula in a spreadsheet


def report_csv(report: Mapping[str, Any]) -> str:
    """The report's rows as CSV: a header line, the group fields, the sums, ``costUsd`` in dollars
    (empty when unpriced). Text starting like a formula (``=``, ``+``, ``-``, ``@``) gets a ``'``."""
    fields = [GROUP_FIELDS[name] for name in report["groupBy"]]
    columns = [*fields, *SUM_FIELDS, "costUsd", "unpricedRequests"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in report["rows"]:
        cost = row["costMicroUsd"]
        values = {**row, "costUsd": None if cost is None else usd(cost)}
        writer.writerow([_cell(values[column]) for column in columns])
    return out.getvalue()


def request_json(row: LedgerRow) -> dict[str, object]:
    return {
        "requestId": row.request_id,
        "clientRequestId": row.client_request_id,
        "at": row.at,
        "teamId": row.team_id,
        "keyId": row.key_id,
        "provider": row.provider,
        "model": row.model,
        "status": row.status,
        "inputTokens": row.input_tokens,
        "outputTokens": row.output_tokens,
        "cacheReadTokens": row.cache_read_tokens,
        "cacheWriteTokens": row.cache_write_tokens,
        "reasoningTokens": row.reasoning_tokens,
        "costUsd": _cost(row.cost_micro_usd),
        "durationMs": row.duration_ms,
        "ttfbMs": row.ttfb_ms,
        "complete": row.complete,
    }


def _teams(request: Request) -> TeamDirectory:
    teams: TeamDirectory = request.state.teams
    return teams


def _once(request: Request, names: Sequence[str]) -> None:
    """Each of ``names`` given at most once: a repeated one (``groupBy=day&groupBy=model``) is refused
    rather than read as one of its values."""
    query = request.query_params
    for name in names:
        if len(query.getlist(name)) > 1:
            raise BadRequest(f"'{name}' is given more than once; give it once (groupBy takes a comma-separated list).")


def _output(request: Request) -> str:
    output = request.query_params.get("format", "json")
    if output not in ("json", "csv"):
        raise BadRequest("'format' must be json or csv.")
    return output


def _report_response(report: Mapping[str, Any], output: str) -> Response:
    if output == "csv":
        return Response(report_csv(report), media_type="text/csv; charset=utf-8")
    return _json(report_json(report))


def _range(request: Request) -> tuple[str, str]:
    query = request.query_params
    start, end = query.get("from"), query.get("to")
    return time_range(
        None if start is None else parse_time(start, "from"), None if end is None else parse_time(end, "to")
    )


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


async def usage(request: Request) -> Response:
    """Admin: usage and cost over a range, grouped and filtered; JSON or CSV."""
    require_admin(request)
    query = request.query_params
    _once(request, ("from", "to", "format", "groupBy", *FILTERS))
    output = _output(request)
    start, end = _range(request)
    group_by = parse_group_by(query.get("groupBy"))
    filters = check_filters({name: query.get(name) for name in FILTERS})
    report = await build_report(_teams(request).store, start, end, group_by, filters)
    return _report_response(report, output)


async def usage_request(request: Request) -> Response:
    """Admin: one request's ledger row."""
    require_admin(request)
    request_id = request.path_params["request_id"]
    row = None if len(request_id) > MAX_REQUEST_ID else await _teams(request).store.usage_request(request_id)
    if row is None:
        raise NotFound(REQUEST_NOT_FOUND_MESSAGE)
    return _json(orjson.dumps(request_json(row)))


async def key_usage(request: Request) -> Response:
    """A key's own usage by day and model; the key is the authority (its id covers it across rotations)."""
    teams = _teams(request)
    if teams.degraded:  # as GET /tokens/{apiKey}: the API speaks for the store, not the cache
        raise StoreUnavailableError("store unavailable")
    _once(request, ("from", "to", "format"))
    output = _output(request)
    start, end = _range(request)
    team = await teams.resolve(request.path_params["api_key"])
    if team is None:
        raise NotFound(NOT_FOUND_MESSAGE)
    report = await build_report(teams.store, start, end, KEY_GROUPS, {"key_id": team.key_id})
    return _report_response(report, output)


routes = [
    route("/usage", {"GET": usage}),
    route("/usage/requests/{request_id}", {"GET": usage_request}),
    route("/tokens/{api_key}/usage", {"GET": key_usage}),
]
