"""The settable fields of keys and teams, one small function each, in tables.

``POST /tokens``, ``PATCH /keys/{keyId}``, ``PATCH /teams/{teamId}`` and the CLI read a body (or
options) field by field through these tables: each function validates its value (a ``BadRequest``
naming the field otherwise) and puts what to store into a ``Change``: the store's columns, and the
field's new value as the API shows it (the audit trail's "after"). A field a table does not hold is
refused, named. Adding a setting is one function and one table entry.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.core.access import check_patterns, check_providers
from service.core.errors import BadRequest
from service.core.store.base import TeamSettings, TokenRecord, list_column, timestamp_at

MAX_EXPIRY_SECONDS = 3650 * 86400
MAX_GRACE_SECONDS = 7 * 86400
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2}))?"
)


@dataclass
class Change:
    """What a body asks for: columns to store and the API's view of the new values."""

    known_providers: tuple[str, ...] | None = None
    creating: bool = False
    """A new key: an expiry must lie in the future (a change may end a key now)."""
    now: float = field(default_factory=time.time)
    columns: dict[str, object] = field(default_factory=dict)
    view: dict[str, Any] = field(default_factory=dict)


Setter = Callable[[object, Change], None]


def duration_seconds(raw: object, field_name: str) -> int:
    """``30d``, ``12h``, ``15m`` or ``90s`` as seconds."""
    match = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise BadRequest(f"'{field_name}' must be a duration like 30d, 12h, 15m or 90s.")
    return int(match.group(1)) * _UNITS[match.group(2)]


def expiry_time(raw: object, field_name: str) -> float:
    """An ISO time with ``Z`` or an offset (or a date: its midnight UTC) as seconds since the epoch."""
    if not isinstance(raw, str) or not _TIME.fullmatch(raw):
        raise BadRequest(f"'{field_name}' must be an ISO time like 2026-12-31T18:00:00Z (or a date).")
    try:
        value = datetime.fromisoformat(raw)
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).timestamp()
    except (ValueError, OverflowError):
        raise BadRequest(f"'{field_name}' must be an ISO time like 2026-12-31T18:00:00Z (or a date).") from None


def _set_expiry(change: Change, at: float | None, field_name: str) -> None:
    if "expires_at" in change.columns:
        raise BadRequest("Send 'expiresAt' or 'expiresIn', not both.")
    if at is not None:
        if at - change.now > MAX_EXPIRY_SECONDS:
            raise BadRequest(f"'{field_name}' must be at most 3650 days ahead.")
        if change.creating and at <= change.now:
            raise BadRequest(f"'{field_name}' must be in the future.")
    stored = None if at is None else timestamp_at(at)
    change.columns["expires_at"] = stored
    change.columns["expiry_recorded"] = False
    change.view["expiresAt"] = stored


def set_expires_at(value: object, change: Change) -> None:
    _set_expiry(change, None if value is None else expiry_time(value, "expiresAt"), "expiresAt")


def set_expires_in(value: object, change: Change) -> None:
    seconds = duration_seconds(value, "expiresIn")
    if seconds < 1:
        raise BadRequest("'expiresIn' must be at least 1s.")
    if seconds > MAX_EXPIRY_SECONDS:
        raise BadRequest("'expiresIn' must be at most 3650d.")
    _set_expiry(change, change.now + seconds, "expiresIn")


def set_allowed_models(value: object, change: Change) -> None:
    try:
        patterns = check_patterns(value, "allowedModels")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    change.columns["allowed_models"] = list_column(patterns)
    change.view["allowedModels"] = None if patterns is None else list(patterns)


def set_allowed_providers(value: object, change: Change) -> None:
    try:
        slugs = check_providers(value, "allowedProviders", change.known_providers)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    change.columns["allowed_providers"] = list_column(slugs)
    change.view["allowedProviders"] = None if slugs is None else list(slugs)


KEY_FIELDS: dict[str, Setter] = {
    "allowedModels": set_allowed_models,
    "allowedProviders": set_allowed_providers,
    "expiresAt": set_expires_at,
    "expiresIn": set_expires_in,
}
"""``PATCH /keys/{keyId}`` (and ``POST /tokens`` beside ``teamId`` and ``name``)."""

TEAM_FIELDS: dict[str, Setter] = {
    "allowedModels": set_allowed_models,
    "allowedProviders": set_allowed_providers,
}
"""``PATCH /teams/{teamId}``."""


def apply(
    payload: Mapping[str, object], table: Mapping[str, Setter], change: Change, also: Sequence[str] = ()
) -> Change:
    """Every field of ``payload`` through its function in ``table``; an unknown field is refused,
    naming every field the request takes (``also``: the ones its caller reads itself)."""
    for name, value in payload.items():
        setter = table.get(name)
        if setter is None:
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise BadRequest(f"Unknown field {shown!r}: expected one of {', '.join([*also, *table])}.")
        setter(value, change)
    return change


def expired(expires_at: str | None, now: float | None = None) -> bool:
    if expires_at is None:
        return False
    return datetime.fromisoformat(expires_at).timestamp() <= (time.time() if now is None else now)


def key_view(record: TokenRecord) -> dict[str, Any]:
    """A key's governance as the API shows it (and the audit trail's "before")."""
    return {
        "allowedModels": None if record.allowed_models is None else list(record.allowed_models),
        "allowedProviders": None if record.allowed_providers is None else list(record.allowed_providers),
        "expiresAt": record.expires_at,
    }


def team_view(team_id: str, settings: TeamSettings | None) -> dict[str, Any]:
    """A team's own settings as the API shows them."""
    if settings is None:
        return {"teamId": team_id, "allowedModels": None, "allowedProviders": None, "updatedAt": None}
    return {
        "teamId": team_id,
        "allowedModels": None if settings.allowed_models is None else list(settings.allowed_models),
        "allowedProviders": None if settings.allowed_providers is None else list(settings.allowed_providers),
        "updatedAt": settings.updated_at,
    }
