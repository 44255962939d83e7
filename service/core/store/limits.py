"""The SQL of limits, shared by both stores: written with ``?`` and numbered for asyncpg (``$1``).

Statements are built from the column constants below only; every value is a parameter.
"""
# ruff: noqa: S608

from __future__ import annotations

import re
from typing import Any

from service.core.limits.model import Limits
from service.core.store.base import Team, TeamSummary
from service.core.store.migrations import ParamStyle

LIMIT_COLUMNS = ("limit_rpm", "limit_tpm", "limit_concurrent", "budget_micro_usd", "budget_period")

GET_TEAM = (
    "SELECT t.team_id, t.name, t.created_at, t.key_id, "
    + ", ".join(f"t.{c}" for c in LIMIT_COLUMNS)
    + ", "
    + ", ".join(f"m.{c}" for c in LIMIT_COLUMNS)
    + " FROM tokens t LEFT JOIN teams m ON m.team_id = t.team_id WHERE t.digest = ?"
)
SET_TEAM = (
    "INSERT INTO teams (team_id, updated_at, " + ", ".join(LIMIT_COLUMNS) + ") VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (team_id) DO UPDATE SET updated_at = excluded.updated_at, "
    + ", ".join(f"{c} = excluded.{c}" for c in LIMIT_COLUMNS)
    + " RETURNING team_id"
)
SET_KEY = "UPDATE tokens SET " + ", ".join(f"{c} = ?" for c in LIMIT_COLUMNS) + " WHERE key_id = ? RETURNING digest"
TEAM_LIMITS = "SELECT " + ", ".join(LIMIT_COLUMNS) + " FROM teams WHERE team_id = ?"
KEY_LIMITS = "SELECT " + ", ".join(LIMIT_COLUMNS) + " FROM tokens WHERE key_id = ?"
_TEAMS = (
    "SELECT k.team_id, k.name, k.keys, "
    + ", ".join(f"m.{c}" for c in LIMIT_COLUMNS)
    + " FROM (SELECT team_id, MIN(name) AS name, COUNT(*) AS keys FROM tokens {where} GROUP BY team_id) k"
    " LEFT JOIN teams m ON m.team_id = k.team_id ORDER BY k.team_id LIMIT ?"
)
TEAMS_FIRST = _TEAMS.format(where="")
TEAMS_AFTER = _TEAMS.format(where="WHERE team_id > ?")
TEAM = (
    "SELECT CAST(? AS TEXT), (SELECT MIN(name) FROM tokens WHERE team_id = ?),"
    " (SELECT COUNT(*) FROM tokens WHERE team_id = ?), "
    + ", ".join(LIMIT_COLUMNS)
    + " FROM (SELECT 1) one LEFT JOIN teams ON team_id = ?"
)
ANY_LIMITS = (
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM teams WHERE "
    + " OR ".join(f"{c} IS NOT NULL" for c in LIMIT_COLUMNS[:4])
    + ") OR EXISTS (SELECT 1 FROM tokens WHERE "
    + " OR ".join(f"{c} IS NOT NULL" for c in LIMIT_COLUMNS[:4])
    + ")"
)
SPENT = {
    "team": "SELECT COALESCE(SUM(cost_micro_usd), 0) FROM usage_daily WHERE team_id = ? AND day >= ?",
    "key": "SELECT COALESCE(SUM(cost_micro_usd), 0) FROM usage_daily WHERE key_id = ? AND day >= ?",
}
EVER = "0000-00-00"


def numbered(sql: str, style: ParamStyle) -> str:
    """``?`` placeholders as the driver wants them."""
    if style == "qmark":
        return sql
    count = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


def team_from_row(row: Any) -> Team:
    return Team(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        str(row[3]),
        key_limits=Limits.from_row(tuple(row[4:9])),
        team_limits=Limits.from_row(tuple(row[9:14])),
    )


def summary_from_row(row: Any) -> TeamSummary | None:
    limits = Limits.from_row(tuple(row[3:8]))
    if not row[2] and limits is None:
        return None
    return TeamSummary(str(row[0]), str(row[1] if row[1] is not None else row[0]), int(row[2]), limits)
