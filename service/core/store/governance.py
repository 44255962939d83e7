"""The SQL of key governance (allow-lists, expiry, rotation grace, the audit trail), shared by both
stores: written once with ``?`` placeholders, numbered (``$1``…) for asyncpg by ``numbered``.

Column names in built statements only ever come from ``KEY_COLUMNS``, ``TEAM_COLUMNS`` and
``AUDIT_FILTERS``; every value is a parameter.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from service.core.store.base import (
    AUDIT_COLUMNS,
    AUDIT_FILTERS,
    KEY_COLUMNS,
    TEAM_COLUMNS,
    Removed,
)
from service.core.store.migrations import ParamStyle

_PLACEHOLDER = re.compile(r"\?")


def numbered(sql: str, style: ParamStyle) -> str:
    """``sql`` in the driver's placeholders: as written (``?``) or ``$1``, ``$2``…"""
    if style == "qmark":
        return sql
    counter = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


REPLACE = (
    "UPDATE tokens SET digest = ?, key_prefix = ?, previous_digest = ?, previous_until = ? WHERE digest = ?"
    " RETURNING digest"
)
"""Params: new digest, new prefix, old digest or NULL, its deadline or NULL, old digest."""

DELETE = (
    "DELETE FROM tokens WHERE digest = ? OR (previous_digest = ? AND previous_until > ?)"
    " RETURNING digest, key_id, team_id, previous_digest"
)
DELETE_ID = "DELETE FROM tokens WHERE key_id = ? RETURNING digest, key_id, team_id, previous_digest"
DELETE_TEAM = "DELETE FROM tokens WHERE team_id = ? RETURNING digest, key_id, team_id, previous_digest"

TEAM_SETTINGS = "SELECT team_id, updated_at, allowed_models, allowed_providers FROM teams WHERE team_id = ?"
COUNT_KEYS = "SELECT count(*) FROM tokens WHERE team_id = ?"
INSERT_AUDIT = "INSERT INTO audit_log (" + AUDIT_COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
ANY_EXPIRED = "SELECT 1 FROM tokens WHERE expires_at <= ? AND NOT expiry_recorded LIMIT 1"
NOTE_EXPIRED = (
    "UPDATE tokens SET expiry_recorded = TRUE WHERE expires_at <= ? AND NOT expiry_recorded"
    " RETURNING key_id, team_id, expires_at"
)


def removed(row: Any) -> Removed:
    digests = (str(row[0]),) if row[3] is None else (str(row[0]), str(row[3]))
    return Removed(str(row[1]), str(row[2]), digests)


def update_key(columns: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
    """``UPDATE tokens SET …`` for ``columns``; the key id is the last parameter, to be appended."""
    names = sorted(columns)
    unknown = set(names) - KEY_COLUMNS
    if unknown or not names:
        raise ValueError(f"not key columns: {sorted(unknown) or 'none'}")
    assignments = ", ".join(f"{name} = ?" for name in names)
    sql = "UPDATE tokens SET " + assignments + " WHERE key_id = ? RETURNING digest, previous_digest"  # noqa: S608
    return sql, tuple(columns[name] for name in names)


def update_team(columns: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
    """An upsert of a team's settings: params team id, updated_at, then the columns' values."""
    names = sorted(columns)
    unknown = set(names) - TEAM_COLUMNS
    if unknown or not names:
        raise ValueError(f"not team columns: {sorted(unknown) or 'none'}")
    placeholders = ", ".join("?" for _ in names)
    updates = ", ".join(f"{name} = excluded.{name}" for name in names)
    sql = (
        "INSERT INTO teams (team_id, updated_at, " + ", ".join(names) + ") VALUES (?, ?, " + placeholders + ")"  # noqa: S608
        " ON CONFLICT (team_id) DO UPDATE SET updated_at = excluded.updated_at, " + updates + " RETURNING team_id"
    )
    return sql, tuple(columns[name] for name in names)


def audit_query(
    limit: int, after: tuple[str, str] | None, filters: Mapping[str, str], start: str | None, end: str | None
) -> tuple[str, tuple[object, ...]]:
    """A page of audit events, newest first."""
    conditions: list[str] = []
    params: list[object] = []
    for name, value in filters.items():
        if name not in AUDIT_FILTERS:
            raise ValueError(f"not an audit filter: {name}")
        conditions.append(f"{name} = ?")
        params.append(value)
    if start is not None:
        conditions.append("at >= ?")
        params.append(start)
    if end is not None:
        conditions.append("at < ?")
        params.append(end)
    if after is not None:
        conditions.append("(at < ? OR (at = ? AND id < ?))")
        params.extend((after[0], after[0], after[1]))
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    sql = "SELECT " + AUDIT_COLUMNS + " FROM audit_log" + where + " ORDER BY at DESC, id DESC LIMIT ?"  # noqa: S608
    return sql, (*params, limit)
