"""Teams and keys with their limits and governance (admin):

- ``GET /teams``: every team that has keys, a page at a time, with its name, key count, limits, state
  and allow-lists;
- ``GET /teams/{teamId}``, ``PATCH /teams/{teamId}``: one team's limits, state and allow-lists, and
  setting them;
- ``GET /keys/{keyId}``, ``PATCH /keys/{keyId}``: the same for one key, with its expiry (with
  ``DELETE`` from the token API).

A PATCH body is an object whose fields are each checked by their own function (``TEAM_FIELDS``,
``KEY_FIELDS``): ``limits`` here, the allow-lists and expiry from ``service.fields``. An unknown
field is a 400 naming it, and nothing is written unless every field is valid. Every change is
recorded in the audit trail (``key.updated``, ``team.updated``) with its before and after.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import fields
from service.core import audit
from service.core.audit import Actor
from service.core.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from service.core.limits.limiter import NEEDS_REDIS, Limiter
from service.core.limits.model import MICRO, NO_LIMITS, PERIODS, Limits
from service.core.limits.outcome import Subject
from service.core.store import StoreUnavailableError, TokenStore
from service.core.store.base import TeamSummary
from service.core.teams import TeamDirectory
from service.tokens import (
    DEFAULT_PAGE,
    KEY_NOT_FOUND_MESSAGE,
    MAX_PAGE,
    MAX_TEAM_ID,
    actor,
    check_text,
    json_object,
    known_providers,
    record_json,
    require_admin,
    revoke_key,
    route,
    whole_number,
)

TEAM_NOT_FOUND = "Team not found"
MAX_COUNT = 1_000_000_000
MAX_BUDGET_USD = 1_000_000_000
LIMIT_FIELDS = ("requestsPerMinute", "tokensPerMinute", "maxConcurrent", "budgetUsd", "budgetPeriod")


def _store(request: Request) -> TokenStore:
    teams: TeamDirectory = request.state.teams
    if teams.degraded:  # the key cache may answer auth for a grace period; the API speaks for the store
        raise StoreUnavailableError("store unavailable")
    return teams.store


def _limiter(request: Request) -> Limiter:
    limiter: Limiter = request.state.limiter
    return limiter


async def _state(request: Request, kind: str, ident: str, limits: Limits | None) -> dict[str, object] | None:
    """The subject's figures now; ``None`` while the limits' store cannot be reached."""
    try:
        state = await _limiter(request).state(Subject(kind, ident, limits or NO_LIMITS))
    except ServiceUnavailable:
        return None
    return state.json(limits, time.time())


# -- checking a PATCH body ------------------------------------------------------------------------


def _count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
        raise BadRequest(f"'limits.{field}' must be a whole number from 1 to {MAX_COUNT}, or null.")
    return value


def _budget(value: object, field: str) -> int | None:
    if value is None:
        return None
    message = (
        f"'limits.{field}' must be a number of US dollars from 0 to {MAX_BUDGET_USD} with at most 6 decimals, or null."
    )
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(message)
    try:
        micro = Decimal(repr(value)) * MICRO
    except InvalidOperation:
        raise BadRequest(message) from None
    if not micro.is_finite() or micro != micro.to_integral_value() or not 0 <= micro <= MAX_BUDGET_USD * MICRO:
        raise BadRequest(message)
    return int(micro)


def _period(value: object, field: str) -> str | None:
    if value is None:
        return None
    if value not in PERIODS:
        raise BadRequest(f"'limits.{field}' must be one of {', '.join(PERIODS)}, or null.")
    return str(value)


_CHECKS: dict[str, tuple[str, Callable[[object, str], int | str | None]]] = {
    "requestsPerMinute": ("requests_per_minute", _count),
    "tokensPerMinute": ("tokens_per_minute", _count),
    "maxConcurrent": ("max_concurrent", _count),
    "budgetUsd": ("budget_micro_usd", _budget),
    "budgetPeriod": ("budget_period", _period),
}

Apply = Callable[[TokenStore, Limiter, str, str], Awaitable[dict[str, Any]]]
"""A checked field's change: (store, limiter, ``team`` or ``key``, id) → written; what changed, as
the audit trail records it (the CLI applies them too, without a request)."""
Field = Callable[[object, fields.Change], Apply | None]
"""A PATCH field's check: its value → its ``Apply``, or ``None`` for a field that only adds columns
to the body's shared ``fields.Change`` (allow-lists and expiry, written together)."""


def limits_field(value: object, change: fields.Change | None = None) -> Apply:
    """``limits``: the given limits replace the stored ones, each ``null`` clearing one; those not
    given stay. A budget without a period runs per calendar month."""
    if not isinstance(value, dict):
        raise BadRequest("'limits' must be an object.")
    for name in value:
        if name not in _CHECKS:
            raise BadRequest(f"Unknown field 'limits.{name}'; the limits are {', '.join(LIMIT_FIELDS)}.")
    changes = {attribute: check(value[name], name) for name, (attribute, check) in _CHECKS.items() if name in value}

    async def apply(store: TokenStore, limiter: Limiter, kind: str, ident: str) -> dict[str, Any]:
        current = await store.limits_of(kind, ident) or NO_LIMITS
        merged = Limits(**{**_as_dict(current), **changes})
        if merged.budget_micro_usd is not None and merged.budget_period is None:
            merged = Limits(**{**_as_dict(merged), "budget_period": "month"})
        if not merged.empty and limiter.kind == "unshared":
            raise Conflict(NEEDS_REDIS)
        if not await store.set_limits(kind, ident, merged):
            raise NotFound(KEY_NOT_FOUND_MESSAGE)
        return audit.diff({"limits": current.json()}, {"limits": merged.json()})

    return apply


def _as_dict(limits: Limits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in Limits.__slots__}


def governance_field(setter: fields.Setter) -> Field:
    """An allow-list or expiry field of ``service.fields``: checked into the shared change."""

    def check(value: object, change: fields.Change | None = None) -> Apply | None:
        setter(value, change if change is not None else fields.Change())
        return None

    return check


TEAM_FIELDS: dict[str, Field] = {
    "limits": limits_field,
    **{name: governance_field(setter) for name, setter in fields.TEAM_FIELDS.items()},
}
KEY_FIELDS: dict[str, Field] = {
    "limits": limits_field,
    **{name: governance_field(setter) for name, setter in fields.KEY_FIELDS.items()},
}


def check_patch(payload: dict[str, Any], table: dict[str, Field], change: fields.Change) -> list[Apply]:
    """Every field of a PATCH body through its check (an unknown field is refused, named): the
    ``Apply`` of each, and the allow-lists and expiry in ``change``."""
    for name in payload:
        if name not in table:
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise BadRequest(f"Unknown field {shown!r}; this object takes {', '.join(table)}.")
    return [apply for name, value in payload.items() if (apply := table[name](value, change)) is not None]


async def apply_patch(
    teams: TeamDirectory,
    limiter: Limiter,
    kind: str,
    ident: str,
    change: fields.Change,
    applies: list[Apply],
    by: Actor,
) -> None:
    """Write a checked PATCH (the API's or the CLI's): the limits, then the allow-lists and expiry,
    and one audit event with every field that changed."""
    store = teams.store
    if kind == "key":
        record = await teams.find(ident)
        if record is None:
            raise NotFound(KEY_NOT_FOUND_MESSAGE)
        changes = audit.diff(fields.key_view(record), change.view)
    else:
        changes = audit.diff(fields.team_view(ident, await store.team_settings(ident)), change.view)
    for apply in applies:
        changes.update(await apply(store, limiter, kind, ident))
    if kind == "key":
        if await teams.update_key(ident, change.columns, changes, by) is None:
            raise NotFound(KEY_NOT_FOUND_MESSAGE)
    else:
        await teams.update_team(ident, change.columns, changes, by)
    teams.clear()  # this process at once; the others within their cache's refresh


async def _patch(request: Request, table: dict[str, Field], kind: str, ident: str) -> None:
    payload = await json_object(request)
    change = fields.Change(known_providers=known_providers(request))
    applies = check_patch(payload, table, change)
    _store(request)  # 503 while the store cannot be reached
    teams: TeamDirectory = request.state.teams
    await apply_patch(teams, _limiter(request), kind, ident, change, applies, actor(request))


# -- teams ----------------------------------------------------------------------------------------


async def _team_json(request: Request, team: TeamSummary) -> dict[str, object]:
    return {
        "teamId": team.team_id,
        "name": team.name,
        "keyCount": team.key_count,
        "limits": (team.limits or NO_LIMITS).json(),
        "state": await _state(request, "team", team.team_id, team.limits),
        **team_settings_json(team),
    }


def team_settings_json(team: TeamSummary) -> dict[str, Any]:
    """A team's allow-lists (for all its keys) and when its settings last changed."""
    return {
        "allowedModels": None if team.allowed_models is None else list(team.allowed_models),
        "allowedProviders": None if team.allowed_providers is None else list(team.allowed_providers),
        "updatedAt": team.updated_at,
    }


def _cursor(team_id: str) -> str:
    return base64.urlsafe_b64encode(team_id.encode()).decode().rstrip("=")


def _after(cursor: str) -> str:
    try:
        team_id = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        return check_text(team_id, "cursor", MAX_TEAM_ID)
    except (ValueError, UnicodeDecodeError, BadRequest):
        raise BadRequest("'cursor' is not a cursor this API returned.") from None


async def list_teams(request: Request) -> Response:
    require_admin(request)
    limit = whole_number(request.query_params.get("limit", str(DEFAULT_PAGE)))
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE}.")
    cursor = request.query_params.get("cursor")
    rows = await _store(request).teams(limit + 1, _after(cursor) if cursor else None)
    page = rows[:limit]
    next_cursor = _cursor(page[-1].team_id) if len(rows) > limit else None
    return JSONResponse({"teams": [await _team_json(request, team) for team in page], "nextCursor": next_cursor})


async def _team_or_404(request: Request, team_id: str) -> TeamSummary:
    team = await _store(request).team(team_id)
    if team is None:
        raise NotFound(TEAM_NOT_FOUND)
    return team


def _team_id(request: Request) -> str:
    team_id: str = request.path_params["team_id"]
    if team_id.endswith("/keys"):  # /teams/{teamId}/keys takes DELETE only
        raise HTTPException(405, headers={"Allow": "DELETE"})
    return check_text(team_id, "teamId", MAX_TEAM_ID)


def _no_route_without_id(request: Request) -> None:
    """``/teams/`` (no id) is no route: the JSON 404 of every path with a trailing slash."""
    if not request.path_params["team_id"]:
        raise HTTPException(404)


async def show_team(request: Request) -> Response:
    _no_route_without_id(request)
    require_admin(request)
    team_id = _team_id(request)
    return JSONResponse(await _team_json(request, await _team_or_404(request, team_id)))


async def patch_team(request: Request) -> Response:
    _no_route_without_id(request)
    require_admin(request)
    team_id = _team_id(request)
    await _patch(request, TEAM_FIELDS, "team", team_id)
    return JSONResponse(await _team_json(request, await _team_or_404(request, team_id)))


# -- keys -----------------------------------------------------------------------------------------


async def _key_json(request: Request, key_id: str) -> dict[str, object]:
    teams: TeamDirectory = request.state.teams
    record = await teams.find(key_id)
    if record is None:
        raise NotFound(KEY_NOT_FOUND_MESSAGE)
    limits = await _store(request).limits_of("key", key_id)
    return {
        **record_json(record),
        "limits": (limits or NO_LIMITS).json(),
        "state": await _state(request, "key", key_id, limits),
    }


async def show_key(request: Request) -> Response:
    """Admin: a key by its id (team, name, id, prefix, creation, last use, allow-lists, expiry, limits,
    state), never the key."""
    require_admin(request)
    return JSONResponse(await _key_json(request, request.path_params["key_id"]))


async def patch_key(request: Request) -> Response:
    require_admin(request)
    key_id = request.path_params["key_id"]
    await _key_json(request, key_id)  # 404 before reading the body
    await _patch(request, KEY_FIELDS, "key", key_id)
    return JSONResponse(await _key_json(request, key_id))


routes = [
    route("/teams", {"GET": list_teams}),
    route("/keys/{key_id}", {"GET": show_key, "PATCH": patch_key, "DELETE": revoke_key}),
]
team_routes = [route("/teams/{team_id:path}", {"GET": show_team, "PATCH": patch_team})]
"""After the token API's ``/teams/{teamId}/keys``, which this path would also match."""
