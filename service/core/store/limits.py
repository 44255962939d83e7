"""The SQL of limits, shared by both stores: written with ``?`` and numbered for asyncpg (``$1``).

Statements are built from the column constants below only; every value is a parameter.
"""
# ruff: noqa: S608

from __future__ import annotations

import re
from typing import Any

from service.core.limits.model import Limits
from service.core.store.base import TEAM_SELECT, Team, TeamSummary, list_value
from service.core.store.base import team_from_row as governance_team
from service.core.store.migrations import ParamStyle

LIMIT_COLUMNS = ("limit_rpm", "limit_tpm", "limit_concurrent", "budget_micro_usd", "budget_period")

GET_TEAM = (
    "SELECT "
    + TEAM_SELECT
    + ", CASE WHEN k.digest = ? THEN NULL ELSE k.previous_until END, "
    + ", ".join(f"k.{c}" for c in LIMIT_COLUMNS)
    + ", "
    + ", ".join(f"t.{c}" for c in LIMIT_COLUMNS)
    + " FROM tokens k LEFT JOIN teams t ON t.team_id = k.team_id"
    " WHERE k.digest = ? OR (k.previous_digest = ? AND k.previous_until > ?) LIMIT 1"
)
"""A key by its digest, or by its previous one while a rotation's grace period runs (then that
deadline): its governance (``TEAM_SELECT``), its own limits and its team's. Params: digest, digest,
digest, now."""
SET_TEAM = (
    "INSERT INTO teams (team_id, updated_at, " + ", ".join(LIMIT_COLUMNS) + ") VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (team_id) DO UPDATE SET updated_at = excluded.updated_at, "
    + ", ".join(f"{c} = excluded.{c}" for c in LIMIT_COLUMNS)
    + " RETURNING team_id"
)
SET_KEY = "UPDATE tokens SET " + ", ".join(f"{c} = ?" for c in LIMIT_COLUMNS) + " WHERE key_id = ? RETURNING digest"
TEAM_LIMITS = "SELECT " + ", ".join(LIMIT_COLUMNS) + " FROM teams WHERE team_id = ?"
KEY_LIMITS = "SELECT " + ", ".join(LIMIT_COLUMNS) + " FROM tokens WHERE key_id = ?"
TEAM_EXTRA = ("allowed_models", "allowed_providers", "updated_at")
"""A team's own settings beside its limits (``TeamSummary``)."""
_TEAMS = (
    "SELECT k.team_id, k.name, k.keys, "
    + ", ".join(f"m.{c}" for c in (*LIMIT_COLUMNS, *TEAM_EXTRA))
    + " FROM (SELECT team_id, MIN(name) AS name, COUNT(*) AS keys FROM tokens {where} GROUP BY team_id) k"
    " LEFT JOIN teams m ON m.team_id = k.team_id ORDER BY k.team_id LIMIT ?"
)
TEAMS_FIRST = _TEAMS.format(where="")
TEAMS_AFTER = _TEAMS.format(where="WHERE team_id > ?")
TEAM = (
    "SELECT CAST(? AS TEXT), (SELECT MIN(name) FROM tokens WHERE team_id = ?),"
    " (SELECT COUNT(*) FROM tokens WHERE team_id = ?), "
    + ", ".join((*LIMIT_COLUMNS, *TEAM_EXTRA))
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
    """A ``GET_TEAM`` row: governance, the previous secret's deadline, then both sets of limits."""
    return governance_team(row, row[9], Limits.from_row(tuple(row[10:15])), Limits.from_row(tuple(row[15:20])))


def summary_from_row(row: Any) -> TeamSummary | None:
    """A team from its keys and its row of settings; ``None`` when it has no key and nothing set."""
    limits = Limits.from_row(tuple(row[3:8]))
    models, providers, updated_at = list_value(row[8]), list_value(row[9]), row[10]
    if not row[2] and limits is None and models is None and providers is None:
        return None
    name = str(row[1] if row[1] is not None else row[0])
    return TeamSummary(str(row[0]), name, int(row[2]), limits, models, providers, updated_at)
