"""Team settings and the audit trail over HTTP (admin).

- ``GET /teams/{teamId}``: the team's own settings (its allow-lists, for all its keys) and how many
  keys it has; 404 for a team with neither;
- ``PATCH /teams/{teamId}``: change them (the fields of ``service.fields.TEAM_FIELDS``);
- ``GET /audit``: the audit trail, newest first, a page at a time (``limit``, ``cursor``), filtered
  on ``teamId``, ``keyId``, ``action`` and a time range ``from`` (included) to ``to`` (excluded).
"""

from __future__ import annotations

import base64
from typing import Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import fields
from service.core import audit
from service.core.errors import BadRequest, NotFound
from service.core.store.base import AuditEvent, TokenStore
from service.core.teams import TeamDirectory
from service.tokens import (
    DEFAULT_PAGE,
    MAX_PAGE,
    MAX_TEAM_ID,
    actor,
    check_text,
    json_object,
    known_providers,
    require_admin,
    route,
    whole_number,
)
from service.usage import parse_time, timestamp

TEAM_NOT_FOUND_MESSAGE = "Team not found"
AUDIT_FILTERS = {"teamId": "team_id", "keyId": "key_id", "action": "action"}
"""Query parameter → the store's filter."""


class TeamPath(Convertor[str]):
    """A team id in a path, ``/`` included (percent-encoded by clients), but never ending in
    ``/keys``: that is ``/teams/{teamId}/keys``, whose other methods must stay a 405."""

    regex = ".*(?<!/keys)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("team", TeamPath())


def _teams(request: Request) -> TeamDirectory:
    teams: TeamDirectory = request.state.teams
    return teams


async def team_json(store: TokenStore, team_id: str) -> dict[str, Any] | None:
    """A team as the API shows it, or ``None`` when it has neither settings nor keys."""
    settings = await store.team_settings(team_id)
    count = await store.count_keys(team_id)
    if settings is None and count == 0:
        return None
    return {**fields.team_view(team_id, settings), "keys": count}


async def show_team(request: Request) -> Response:
    require_admin(request)
    team_id = check_text(request.path_params["team_id"], "teamId", MAX_TEAM_ID)
    shown = await team_json(_teams(request).store, team_id)
    if shown is None:
        raise NotFound(TEAM_NOT_FOUND_MESSAGE)
    return JSONResponse(shown)


async def update_team(request: Request) -> Response:
    """Admin: a team's allow-lists, for every key it has and will have (a team without keys yet
    may be given them first)."""
    require_admin(request)
    team_id = check_text(request.path_params["team_id"], "teamId", MAX_TEAM_ID)
    payload = await json_object(request)
    teams = _teams(request)
    change = fields.apply(payload, fields.TEAM_FIELDS, fields.Change(known_providers=known_providers(request)))
    before = fields.team_view(team_id, await teams.store.team_settings(team_id))
    await teams.update_team(team_id, change.columns, audit.diff(before, change.view), actor(request))
    settings = await teams.store.team_settings(team_id)  # none yet when nothing was set
    return JSONResponse({**fields.team_view(team_id, settings), "keys": await teams.store.count_keys(team_id)})


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": event.at,
        "action": event.action,
        "actor": event.actor,
        "teamId": event.team_id,
        "keyId": event.key_id,
        "changes": event.changes,
        "clientAddress": event.client_address,
        "requestId": event.request_id,
    }


def encode_cursor(event: AuditEvent) -> str:
    return base64.urlsafe_b64encode(f"{event.at}|{event.id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        at, event_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("'cursor' is not a cursor this API returned.") from None
    return at, event_id


def audit_filters(values: dict[str, str | None]) -> dict[str, str]:
    """The store's filters for ``teamId``, ``keyId`` and ``action`` (``None``: not filtered)."""
    filters: dict[str, str] = {}
    for name, column in AUDIT_FILTERS.items():
        value = values.get(name)
        if value is None:
            continue
        if name == "action" and value not in audit.ACTIONS:
            raise BadRequest(f"'action' must be one of {', '.join(audit.ACTIONS)}.")
        filters[column] = check_text(value, name, MAX_TEAM_ID)
    return filters


async def audit_page(
    store: TokenStore,
    limit: int,
    cursor: str | None,
    filters: dict[str, str],
    start: str | None,
    end: str | None,
) -> dict[str, Any]:
    """A page of the audit trail as ``GET /audit`` answers it (the CLI prints the same)."""
    events = await store.audit(limit + 1, decode_cursor(cursor) if cursor else None, filters, start, end)
    page = events[:limit]
    next_cursor = encode_cursor(page[-1]) if len(events) > limit else None
    return {"events": [event_json(event) for event in page], "nextCursor": next_cursor}


async def list_audit(request: Request) -> Response:
    require_admin(request)
    query = request.query_params
    limit = whole_number(query.get("limit", str(DEFAULT_PAGE)))
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE}.")
    filters = audit_filters({name: query.get(name) for name in AUDIT_FILTERS})
    start = timestamp(parse_time(query["from"], "from")) if "from" in query else None
    end = timestamp(parse_time(query["to"], "to")) if "to" in query else None
    if start is not None and end is not None and start > end:
        raise BadRequest("'from' must not be after 'to'.")
    return JSONResponse(await audit_page(_teams(request).store, limit, query.get("cursor"), filters, start, end))


routes = [
    route("/teams/{team_id:team}", {"GET": show_team, "PATCH": update_team}),
    route("/audit", {"GET": list_audit}),
]
