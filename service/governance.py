"""The audit trail over HTTP (admin).

- ``GET /audit``: the audit trail, newest first, a page at a time (``limit``, ``cursor``), filtered
  on ``teamId``, ``keyId``, ``action`` and a time range ``from`` (included) to ``to`` (excluded).

A team's and a key's allow-lists and expiry are read and set with their limits, in ``service.teams_api``.
"""

from __future__ import annotations

import base64
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.core import audit
from service.core.errors import BadRequest
from service.core.store.base import AuditEvent, TokenStore
from service.core.teams import TeamDirectory
from service.tokens import (
    DEFAULT_PAGE,
    MAX_PAGE,
    MAX_TEAM_ID,
    check_text,
    require_admin,
    route,
    whole_number,
)
from service.usage import parse_time, timestamp

AUDIT_FILTERS = {"teamId": "team_id", "keyId": "key_id", "action": "action"}
"""Query parameter → the store's filter."""


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
    teams: TeamDirectory = request.state.teams
    return JSONResponse(await audit_page(teams.store, limit, query.get("cursor"), filters, start, end))


routes = [route("/audit", {"GET": list_audit})]
