"""The token API, compatible with the original Worker's.

- ``POST /tokens`` (admin) issues a key for a team;
- ``GET /tokens/{apiKey}`` shows the key's team (possession of the key is the authority);
- ``POST /tokens/{apiKey}/refresh`` rotates it (same key id, team, name and creation time); the key
  alone suffices unless ``SELF_SERVICE_ROTATION=false``, which requires the admin bearer;
- ``DELETE /tokens/{apiKey}`` (admin) revokes it;
- ``GET /tokens`` (admin) lists keys page by page: id, prefix, team, name, creation and last use;
- ``DELETE /keys/{keyId}`` (admin) revokes a key by its id, without its secret (``GET`` and ``PATCH``
  of the same path, with the key's limits, are in ``service.teams_api``);
- ``DELETE /teams/{teamId}/keys`` (admin) revokes every key of a team.

Errors are ``{"error": "…"}`` with the right status, never a 500.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.errors import AuthenticationFailed, BadRequest, Forbidden, NotFound, PayloadTooLarge
from service.core.store import StoreUnavailableError, Team, TokenRecord
from service.core.teams import TeamDirectory

MAX_BODY_BYTES = 64 * 1024
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_TEAM_ID = 128
MAX_NAME = 256
NOT_FOUND_MESSAGE = "Token not found"
KEY_NOT_FOUND_MESSAGE = "Key not found"


def whole_number(raw: str) -> int | None:
    """``raw`` as a whole number when it is ASCII digits only, else ``None`` (superscript and
    fullwidth digits, signs, spaces and underscores, which ``int`` would take or trip on, are refused)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return None
    return int(raw)


def check_text(value: object, field: str, limit: int) -> str:
    """A team id or name as the API and the CLI accept it: a non-blank string of printable
    characters, at most ``limit`` of them; a ``BadRequest`` naming ``field`` otherwise."""
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string.")
    if not value.strip():
        raise BadRequest(f"'{field}' must not be empty.")
    if not value.isprintable():
        raise BadRequest(f"'{field}' must not contain control characters.")
    if len(value) > limit:
        raise BadRequest(f"'{field}' must be at most {limit} characters.")
    return value


def _teams(request: Request) -> TeamDirectory:
    teams: TeamDirectory = request.state.teams
    return teams


def require_admin(request: Request) -> None:
    admin_key: str | None = request.app.state.settings.admin_api_key
    if not admin_key:
        raise Forbidden("Token administration is disabled: set ADMIN_API_KEY on the gateway to enable it.")
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthenticationFailed("Missing admin key: send 'Authorization: Bearer <ADMIN_API_KEY>'.")
    if not hmac.compare_digest(presented.strip().encode(), admin_key.encode()):
        raise AuthenticationFailed("Invalid admin key.")


async def json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object of at most ``MAX_BODY_BYTES``; a 400 or 413 otherwise."""
    declared = whole_number(request.headers.get("content-length") or "")
    if declared is not None and declared > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"Request body exceeds {MAX_BODY_BYTES} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"Request body exceeds {MAX_BODY_BYTES} bytes.")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body must be valid JSON.") from None
    if not isinstance(value, dict):
        raise BadRequest("Request body must be a JSON object.")
    return value


def _text_field(payload: dict[str, Any], field: str, limit: int, *, required: bool) -> str | None:
    if field not in payload or payload[field] is None:
        if required:
            raise BadRequest(f"'{field}' is required.")
        return None
    return check_text(payload[field], field, limit)


def team_json(team: Team) -> dict[str, str]:
    return {"keyId": team.key_id, "teamId": team.team_id, "name": team.name, "createdAt": team.created_at}


def issued_json(key: str, team: Team) -> dict[str, str]:
    return {"apiKey": key, **team_json(team)}


async def create_token(request: Request) -> Response:
    require_admin(request)
    payload = await json_object(request)
    team_id = _text_field(payload, "teamId", MAX_TEAM_ID, required=True)
    assert team_id is not None
    name = _text_field(payload, "name", MAX_NAME, required=False) or team_id
    key, team = await _teams(request).issue(team_id, name)
    return JSONResponse(issued_json(key, team), status_code=201)


async def show_token(request: Request) -> Response:
    teams = _teams(request)
    if teams.degraded:  # the cache may answer auth for a grace period, but the API speaks for the store
        raise StoreUnavailableError("store unavailable")
    team = await teams.resolve(request.path_params["api_key"])
    if team is None:
        raise NotFound(NOT_FOUND_MESSAGE)
    return JSONResponse(team_json(team))


async def refresh_token(request: Request) -> Response:
    if not request.app.state.settings.self_service_rotation:
        require_admin(request)
    rotated = await _teams(request).rotate(request.path_params["api_key"])
    if rotated is None:
        raise NotFound(NOT_FOUND_MESSAGE)
    key, team = rotated
    return JSONResponse(issued_json(key, team))


async def revoke_token(request: Request) -> Response:
    require_admin(request)
    if not await _teams(request).revoke(request.path_params["api_key"]):
        raise NotFound(NOT_FOUND_MESSAGE)
    return Response(status_code=204)


def encode_cursor(created_at: str, digest: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}|{digest}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, digest = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("'cursor' is not a cursor this API returned.") from None
    return created_at, digest


def record_json(record: TokenRecord) -> dict[str, str | None]:
    return {
        "keyId": record.key_id,
        "keyPrefix": record.key_prefix + "…" if record.key_prefix else None,
        "teamId": record.team_id,
        "name": record.name,
        "createdAt": record.created_at,
        "lastUsedAt": record.last_used_at,
    }


async def list_tokens(request: Request) -> Response:
    """Admin: a page of keys in creation order, never the keys themselves."""
    require_admin(request)
    limit = whole_number(request.query_params.get("limit", str(DEFAULT_PAGE)))
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE}.")
    cursor = request.query_params.get("cursor")
    team_id = request.query_params.get("teamId")
    if team_id is not None:
        check_text(team_id, "teamId", MAX_TEAM_ID)
    rows = await _teams(request).store.list(limit + 1, decode_cursor(cursor) if cursor else None, team_id)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1][0].created_at, page[-1][1]) if len(rows) > limit else None
    return JSONResponse({"tokens": [record_json(record) for record, _ in page], "nextCursor": next_cursor})


async def revoke_key(request: Request) -> Response:
    """Admin: revoke a key by its id, when its secret is not at hand (or was rotated by someone else)."""
    require_admin(request)
    if not await _teams(request).revoke_id(request.path_params["key_id"]):
        raise NotFound(KEY_NOT_FOUND_MESSAGE)
    return Response(status_code=204)


async def revoke_team_keys(request: Request) -> Response:
    """Admin: revoke every key of a team; how many there were (0 is not an error)."""
    require_admin(request)
    team_id = check_text(request.path_params["team_id"], "teamId", MAX_TEAM_ID)
    return JSONResponse({"revoked": await _teams(request).revoke_team(team_id)})


def route(path: str, handlers: dict[str, Callable[[Request], Awaitable[Response]]]) -> Route:
    """One route per path, dispatching on the method, so that a 405 lists in ``Allow`` every
    method the path has (one route per method would list only the first route's)."""

    async def dispatch(request: Request) -> Response:
        return await handlers["GET" if request.method == "HEAD" else request.method](request)

    return Route(path, dispatch, methods=list(handlers))


routes = [
    route("/tokens", {"GET": list_tokens, "POST": create_token}),
    route("/tokens/{api_key}", {"GET": show_token, "DELETE": revoke_token}),
    route("/tokens/{api_key}/refresh", {"POST": refresh_token}),
    route("/teams/{team_id:path}/keys", {"DELETE": revoke_team_keys}),
]
