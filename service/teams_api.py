"""Teams and keys with their limits (admin):

- ``GET /teams``: every team that has keys, a page at a time, with its name, key count, limits and state;
- ``GET /teams/{teamId}``, ``PATCH /teams/{teamId}``: one team's limits and state, and setting them;
- ``GET /keys/{keyId}``, ``PATCH /keys/{keyId}``: the same for one key (with ``DELETE`` from the token API).

A PATCH body is an object whose fields are each checked and applied by their own function
(``TEAM_FIELDS``, ``KEY_FIELDS``): an unknown field is a 400 naming it, and nothing is written
unless every field is valid.
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
    check_text,
    json_object,
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

Apply = Callable[[TokenStore, Limiter, str, str], Awaitable[None]]
"""A checked field's change: (store, limiter, ``team`` or ``key``, id) → written (the CLI applies
them too, without a request)."""


def limits_field(value: object) -> Apply:
    """``limits``: the given limits replace the stored ones, each ``null`` clearing one; those not
    given stay. A budget without a period runs per calendar month."""
    if not isinstance(value, dict):
        raise BadRequest("'limits' must be an object.")
    for name in value:
        if name not in _CHECKS:
            raise BadRequest(f"Unknown field 'limits.{name}'; the limits are {', '.join(LIMIT_FIELDS)}.")
    changes = {attribute: check(value[name], name) for name, (attribute, check) in _CHECKS.items() if name in value}

    async def apply(store: TokenStore, limiter: Limiter, kind: str, ident: str) -> None:
        current = await store.limits_of(kind, ident) or NO_LIMITS
        merged = Limits(**{**_as_dict(current), **changes})
        if merged.budget_micro_usd is not None and merged.budget_period is None:
            merged = Limits(**{**_as_dict(merged), "budget_period": "month"})
        if not merged.empty and limiter.kind == "unshared":
            raise Conflict(NEEDS_REDIS)
        if not await store.set_limits(kind, ident, merged):
            raise NotFound(KEY_NOT_FOUND_MESSAGE)

    return apply


def _as_dict(limits: Limits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in Limits.__slots__}


TEAM_FIELDS: dict[str, Callable[[object], Apply]] = {"limits": limits_field}
KEY_FIELDS: dict[str, Callable[[object], Apply]] = {"limits": limits_field}


async def _patch(request: Request, fields: dict[str, Callable[[object], Apply]], kind: str, ident: str) -> None:
    payload = await json_object(request)
    for name in payload:
        if name not in fields:
            raise BadRequest(f"Unknown field '{name}'; this object takes {', '.join(fields)}.")
    changes = [fields[name](value) for name, value in payload.items()]
    for apply in changes:
        await apply(_store(request), _limiter(request), kind, ident)
    teams: TeamDirectory = request.state.teams
    teams.clear()  # this process at once; the others within their cache's refresh


# -- teams ----------------------------------------------------------------------------------------


async def _team_json(request: Request, team: TeamSummary) -> dict[str, object]:
    return {
        "teamId": team.team_id,
        "name": team.name,
        "keyCount": team.key_count,
        "limits": (team.limits or NO_LIMITS).json(),
        "state": await _state(request, "team", team.team_id, team.limits),
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


async def show_team(request: Request) -> Response:
    require_admin(request)
    team_id = _team_id(request)
    return JSONResponse(await _team_json(request, await _team_or_404(request, team_id)))


async def patch_team(request: Request) -> Response:
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
    """Admin: a key by its id (team, name, id, prefix, creation, last use, limits, state), never the key."""
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
