"""The usage ledger's SQL, shared by both stores: built here once, from constants and a whitelist.

Nothing a caller passes is ever put into a statement: group and filter names only choose among the
expressions below (an unknown one raises ``ValueError``), and every value is a parameter, written
in the store's own placeholders (``?`` for sqlite3, ``$1`` for asyncpg).

Times are ISO UTC text (``2026-11-30T14:02:11.482Z``), so ranges compare as text and truncating a
time to its hour or day is ``substr(at, 1, 13)`` or ``substr(at, 1, 10)`` in both databases.

In SQLite the ledger has no time index (one B-tree insertion fewer per proxied request): the
gateway's request ids start with the request's time (``new_request_id``: 12 hex digits of
milliseconds, 32 characters in all), so a time range is a range of its primary key. Rows whose id
is of another length (the 24-character ids written before) keep a partial time index of their own;
a range reads both (SQLite's multi-index OR), and the time condition itself always applies too. (The
ledger is written by the gateway alone: a 32-character id is taken to start with its time.)
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.core.store.migrations import ParamStyle

if TYPE_CHECKING:  # service.core.ledger imports the store package: the class is only imported to build rows
    from service.core.ledger import LedgerRow, LedgerValues

LEDGER_COLUMNS = (
    "request_id",
    "client_request_id",
    "at",
    "team_id",
    "key_id",
    "provider",
    "model",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "duration_ms",
    "ttfb_ms",
    "complete",
)
TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
DAILY_KEY = ("day", "team_id", "key_id", "provider", "model")
DAILY_SUMS = ("requests", *TOKEN_COLUMNS, "cost_micro_usd", "unpriced_requests")
DAILY_COLUMNS = (*DAILY_KEY, *DAILY_SUMS)


@dataclass(frozen=True, slots=True)
class Group:
    ledger: str
    """The expression over ``usage_ledger``."""
    daily: str | None
    """The expression over ``usage_daily``; ``None``: that table cannot answer it (hours)."""
    field: str
    """The name in a report row."""


GROUPS: dict[str, Group] = {
    "hour": Group("substr(at, 1, 13)", None, "hour"),
    "day": Group("substr(at, 1, 10)", "day", "day"),
    "team": Group("team_id", "team_id", "teamId"),
    "key": Group("key_id", "key_id", "keyId"),
    "provider": Group("provider", "provider", "provider"),
    "model": Group("COALESCE(model, '')", "model", "model"),
}
"""What a report may be grouped by (``usage_daily`` keeps ``''`` for a missing model, as here)."""
FILTERS = {"team_id": "team_id", "key_id": "key_id", "provider": "provider", "model": "model"}
"""What a report may be filtered on: the filter's name → its column (the same in both tables)."""
SUM_FIELDS = (
    "requests",
    "inputTokens",
    "outputTokens",
    "cacheReadTokens",
    "cacheWriteTokens",
    "reasoningTokens",
    "costMicroUsd",
    "unpricedRequests",
)
LEDGER_SUMS = (
    "COUNT(*)",
    *(f"COALESCE(SUM({column}), 0)" for column in TOKEN_COLUMNS),
    "SUM(cost_micro_usd)",  # NULL when no request of the group was priced
    "COUNT(*) - COUNT(cost_micro_usd)",
)
DAILY_REPORT_SUMS = (
    "SUM(requests)",
    *(f"SUM({column})" for column in TOKEN_COLUMNS),
    "CASE WHEN SUM(requests) > SUM(unpriced_requests) THEN SUM(cost_micro_usd) END",
    "SUM(unpriced_requests)",
)

ReportRows = list[dict[str, object]]
"""What ``usage_report`` returns (named here: the stores' own ``list`` method hides the builtin)."""
FailureRows = list[tuple[int, int, int]]
"""What ``usage_failures`` returns: (status, requests, incomplete)."""

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
MIDNIGHT = "T00:00:00.000Z"


def bound(value: str) -> str:
    """A range bound as the ledger writes times: a date (``2026-11-01``) becomes its midnight;
    a time must already be ``2026-11-01T12:00:00.000Z``. ``ValueError`` otherwise."""
    if _DATE.fullmatch(value):
        return value + MIDNIGHT
    if _TIME.fullmatch(value):
        return value
    raise ValueError(f"not a date (2026-11-01) or a UTC time (2026-11-01T12:00:00.000Z): {value!r}")


def _id_prefix(time_text: str) -> str:
    """The request id prefix of a ledger time (``2026-11-01T12:00:00.000Z``): its milliseconds since
    the epoch as 12 hex digits, as ``new_request_id`` writes them."""
    seconds = calendar.timegm(time.strptime(time_text[:19], "%Y-%m-%dT%H:%M:%S"))
    return f"{seconds * 1000 + int(time_text[20:23]):012x}"


LEDGER_RANGE_SQLITE = (
    "((request_id >= ? AND request_id < ?) OR (length(request_id) <> 32 AND at >= ? AND at < ?)) AND at >= ? AND at < ?"
)
"""Ledger rows from ``start`` (included) to ``end`` (excluded) in SQLite, with ``range_params``."""


def range_params(start: str, end: str) -> tuple[str, str, str, str, str, str]:
    """The parameters of ``LEDGER_RANGE_SQLITE`` for two bounds as the ledger writes times."""
    return (_id_prefix(start), _id_prefix(end), start, end, start, end)


def placeholders(style: ParamStyle, count: int, first: int = 1) -> list[str]:
    """``count`` parameter markers in a driver's style, numbered from ``first`` (asyncpg)."""
    return ["?"] * count if style == "qmark" else [f"${n}" for n in range(first, first + count)]


@dataclass(frozen=True, slots=True)
class Report:
    """A report's statement, its parameters, and the group fields its rows start with."""

    sql: str
    params: tuple[object, ...]
    fields: tuple[str, ...]
    daily: bool
    """Read from ``usage_daily`` (whole days, no hours) rather than ``usage_ledger``."""


def report_query(
    style: ParamStyle, start: str, end: str, group_by: Sequence[str], filters: Mapping[str, str]
) -> Report:
    """The statement for ``usage_report``. Whole days without ``hour`` read the daily totals (fast
    over long ranges, and there after the ledger rows are pruned); anything else reads the ledger."""
    start, end = bound(start), bound(end)
    unknown = [name for name in group_by if name not in GROUPS] + [name for name in filters if name not in FILTERS]
    if unknown:
        raise ValueError(f"cannot group or filter by {unknown[0]!r}")
    groups = [GROUPS[name] for name in dict.fromkeys(group_by)]
    daily = all(group.daily is not None for group in groups) and start.endswith(MIDNIGHT) and end.endswith(MIDNIGHT)
    if daily:
        table, time_column, sums = "usage_daily", "day", DAILY_REPORT_SUMS
        params: list[object] = [start[:10], end[:10]]
        expressions = [group.daily or "" for group in groups]
    else:
        table, time_column, sums = "usage_ledger", "at", LEDGER_SUMS
        params = [start, end]
        expressions = [group.ledger for group in groups]
    conditions = [f"{time_column} >= {{}}", f"{time_column} < {{}}"]
    for name, value in filters.items():
        conditions.append(f"{FILTERS[name]} = {{}}")
        params.append(value)
    marks = placeholders(style, len(params))
    where = " AND ".join(condition.format(mark) for condition, mark in zip(conditions, marks, strict=True))
    if not daily and style == "qmark":  # SQLite's ledger: the range by request id (see above)
        where = " AND ".join([LEDGER_RANGE_SQLITE, *(condition.format("?") for condition in conditions[2:])])
        params[:2] = range_params(start, end)
    positions = ", ".join(str(n) for n in range(1, len(groups) + 1))
    tail = f" GROUP BY {positions} ORDER BY {positions}" if groups else ""
    sql = f"SELECT {', '.join([*expressions, *sums])} FROM {table} WHERE {where}{tail}"  # noqa: S608 (constants only)
    return Report(sql, tuple(params), tuple(group.field for group in groups), daily)


def report_rows(report: Report, raw: Sequence[Sequence[Any]]) -> ReportRows:
    """Rows as ``usage_report`` returns them: the group fields, then the sums as integers
    (PostgreSQL sums come back as decimals), ``costMicroUsd`` ``None`` when nothing was priced."""
    rows: ReportRows = []
    width = len(report.fields)
    for record in raw:
        if not record[width]:  # no request at all (an ungrouped report of an empty range)
            continue
        row: dict[str, object] = {}
        for name, value in zip(report.fields, record[:width], strict=True):
            if name == "hour":
                value = f"{value}:00:00Z"
            elif name == "model":
                value = value or None
            row[name] = value
        for name, value in zip(SUM_FIELDS, record[width:], strict=True):
            row[name] = None if value is None else int(value)
        rows.append(row)
    return rows


def unique(rows: Sequence[LedgerValues]) -> list[LedgerValues]:
    """The rows with the first of each request id (a batch holding one twice counts it once)."""
    first: dict[str, LedgerValues] = {}
    for row in rows:
        first.setdefault(row[0], row)
    return list(first.values())


def ledger_row(record: Sequence[Any]) -> LedgerRow:
    """A ``usage_ledger`` row (its columns in ``LEDGER_COLUMNS`` order) as the writer made it."""
    from service.core.ledger import LedgerRow

    values = list(record)
    values[-1] = bool(values[-1])  # SQLite keeps booleans as 0 and 1
    return LedgerRow(*values)


def daily_totals(rows: Sequence[LedgerValues]) -> list[tuple[object, ...]]:
    """What ``rows`` add to ``usage_daily``, one tuple per (day, team, key, provider, model) in
    ``DAILY_COLUMNS`` order, sorted: writers touch the totals in one order, so never deadlock."""
    totals: dict[tuple[str, str, str, str, str], list[int]] = {}
    for _, _, at, team_id, key_id, provider, model, _, inp, out, read, write, reasoning, cost, _, _, _ in rows:
        key = (at[:10], team_id, key_id, provider, model or "")
        sums = totals.get(key)
        if sums is None:
            sums = totals[key] = [0] * len(DAILY_SUMS)
        sums[0] += 1
        if inp:  # None (not reported) and 0 add nothing: no addition at all
            sums[1] += inp
        if out:
            sums[2] += out
        if read:
            sums[3] += read
        if write:
            sums[4] += write
        if reasoning:
            sums[5] += reasoning
        if cost is None:
            sums[7] += 1
        else:
            sums[6] += cost
    return [(*key, *sums) for key, sums in sorted(totals.items())]


def upsert_daily(style: ParamStyle) -> str:
    """Add one tuple of ``daily_totals`` to ``usage_daily`` (the same statement in both databases)."""
    marks = ", ".join(placeholders(style, len(DAILY_COLUMNS)))
    added = ", ".join(f"{column} = usage_daily.{column} + excluded.{column}" for column in DAILY_SUMS)
    insert = f"INSERT INTO usage_daily ({', '.join(DAILY_COLUMNS)}) VALUES ({marks})"  # noqa: S608 (constants only)
    return f"{insert} ON CONFLICT ({', '.join(DAILY_KEY)}) DO UPDATE SET {added}"


def insert_ledger_sqlite(rows: int) -> str:
    """Insert ``rows`` ledger rows in one statement (their values one after the other), skipping a
    request id already recorded or met earlier in the statement."""
    row = f"({', '.join('?' * len(LEDGER_COLUMNS))})"
    values = ", ".join([row] * rows)
    return f"INSERT INTO usage_ledger ({', '.join(LEDGER_COLUMNS)}) VALUES {values} ON CONFLICT (request_id) DO NOTHING"  # noqa: S608


INSERT_LEDGER_SQLITE = insert_ledger_sqlite(1)
"""Insert one ledger row (``executemany`` runs it once per row, prepared once)."""
LEDGER_CHUNKS_SQLITE = {size: insert_ledger_sqlite(size) for size in (48, 16, 4)}
"""Statements inserting several rows at once, largest first: a batch goes out in as many of the
largest as fit, then the next size down, the last few rows through ``executemany`` of the one-row
statement. One statement of 48 rows costs a fifth less per row than 48 steps of the one-row one
(~20k against 25.1k instructions a row, measured on SQLite alone); the sizes are few, so their
prepared statements stay in the connection's statement cache. 48 rows are 816 bound values: under
the 999 that SQLite before 3.32 allows a statement (``SQLITE_MAX_VARIABLE_NUMBER``)."""
LAST_ROWID_SQLITE = "SELECT coalesce(max(rowid), 0) FROM usage_ledger"
UPSERT_DAILY_SQLITE = upsert_daily("qmark")
ADD_DAILY_SQLITE = (
    f"INSERT INTO usage_daily ({', '.join(DAILY_COLUMNS)})"  # noqa: S608 (constants only)
    " SELECT substr(at, 1, 10), team_id, key_id, provider, coalesce(model, ''), count(*),"
    + ", ".join(f" coalesce(sum({column}), 0)" for column in (*TOKEN_COLUMNS, "cost_micro_usd"))
    + ", count(*) - count(cost_micro_usd) FROM usage_ledger WHERE rowid > ?"
    " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"
    f" ON CONFLICT ({', '.join(DAILY_KEY)}) DO UPDATE SET "
    + ", ".join(f"{column} = usage_daily.{column} + excluded.{column}" for column in DAILY_SUMS)
)
"""Add to ``usage_daily`` the totals of the ledger rows past a rowid: exactly the rows a batch
inserted (SQLite numbers new rows past the largest rowid), summed by SQLite, the same sums as
``daily_totals``. Used when a batch held a request id already recorded; otherwise ``daily_totals``
sums the batch in Python at a fifth of the cost (no read-back, no sort)."""


PG_TYPES = ("text",) * 7 + ("int4",) + ("int8",) * 6 + ("float8", "float8", "bool")
INSERT_LEDGER_POSTGRES = (
    f"INSERT INTO usage_ledger ({', '.join(LEDGER_COLUMNS)}) SELECT * FROM unnest("  # noqa: S608 (constants only)
    + ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(PG_TYPES, start=1))
    + ") ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
"""Insert a batch given as one array per column, skipping request ids already recorded; the ids inserted."""

SELECT_REQUEST = {
    style: f"SELECT {', '.join(LEDGER_COLUMNS)} FROM usage_ledger WHERE request_id = {mark}"  # noqa: S608
    for style, mark in (("qmark", "?"), ("numeric", "$1"))
}
FAILURES = {
    style: "SELECT status, COUNT(*), SUM(CASE WHEN complete THEN 0 ELSE 1 END) FROM usage_ledger"  # noqa: S608
    f" WHERE {where} AND (status >= 400 OR NOT complete) GROUP BY status ORDER BY status"
    for style, where in (("qmark", LEDGER_RANGE_SQLITE), ("numeric", "at >= $1 AND at < $2"))
}
"""Requests that failed (status 400 and over) or whose response did not reach its end, by status
(SQLite's takes ``range_params``)."""
PRUNE = {
    "qmark": "DELETE FROM usage_ledger WHERE (request_id < ? OR (length(request_id) <> 32 AND at < ?)) AND at < ?",
    "numeric": "DELETE FROM usage_ledger WHERE at < $1",
}
"""Delete the ledger rows from before a time (SQLite's takes ``prune_params``)."""


def prune_params(before: str) -> tuple[str, str, str]:
    """The parameters of SQLite's ``PRUNE`` for a bound as the ledger writes times."""
    return (_id_prefix(before), before, before)
