"""The token API, compatible with the original Worker's.

- ``POST /tokens`` (admin) issues a key for a team;
- ``GET /tokens/{apiKey}`` shows the key's team (possession of the key is the authority);
- ``POST /tokens/{apiKey}/refresh`` rotates it (same key id, team, name and creation time); the key
  alone suffices unless ``SELF_SERVICE_ROTATION=false``, which requires the admin bearer;
- ``DELETE /tokens/{apiKey}`` (admin) revokes it;
- ``GET /tokens`` (admin) lists keys page by page: id, prefix, team, name, creation and last use;
- ``DELETE /keys/{keyId}`` (admin) revokes a key by its id, without its secret (``GET`` and ``PATCH``
  of the same path, with the key's limits, allow-lists and expiry, are in ``service.teams_api``);
- ``DELETE /teams/{teamId}/keys`` (admin) revokes every key of a team.

Keys may carry allow-lists (``allowedModels``, ``allowedProviders``) and an expiry (``expiresAt`` or
``expiresIn``), set at creation or with ``PATCH /keys/{keyId}`` (the fields: ``service.fields``). A rotation may
keep the old secret working for ``graceSeconds``. Every change is recorded in the audit trail
(``service.core.audit``) with its actor: ``admin-api``, or ``key`` for a key rotating itself.

Errors are ``{"error": "…"}`` with the right status, never a 500.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import fields
from service.core.audit import Actor
from service.core.errors import AuthenticationFailed, BadRequest, Forbidden, KeyExpired, NotFound, PayloadTooLarge
from service.core.request import SCOPE_KEY, RequestInfo
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


def actor(request: Request, name: str = "admin-api") -> Actor:
    """Who makes a change through the API: the actor, the client's address (as the unknown-key
    guard sees it, behind ``TRUSTED_PROXIES`` too) and the request id."""
    guard = getattr(request.state, "guard", None)
    address = guard.address(request.scope) if guard is not None else (request.client.host if request.client else None)
    info: RequestInfo | None = request.scope.get(SCOPE_KEY)
    return Actor(name, address, info.request_id if info is not None else None)


def known_providers(request: Request) -> tuple[str, ...]:
    known: tuple[str, ...] = request.app.state.known_providers
    return known


def is_admin(request: Request) -> bool:
    """Whether the request carries the right admin bearer (no error when it does not)."""
    admin_key: str | None = request.app.state.settings.admin_api_key
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return bool(
        admin_key and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), admin_key.encode())
    )


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


async def json_object(request: Request, *, empty: bool = False) -> dict[str, Any]:
    """The request's body as a JSON object of at most ``MAX_BODY_BYTES``; a 400 or 413 otherwise
    (``empty``: no body at all is ``{}``)."""
    declared = whole_number(request.headers.get("content-length") or "")
    if declared is not None and declared > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"Request body exceeds {MAX_BODY_BYTES} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"Request body exceeds {MAX_BODY_BYTES} bytes.")
    if empty and not body.strip():
        return {}
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


def governance_json(
    allowed_models: tuple[str, ...] | None, allowed_providers: tuple[str, ...] | None, expires_at: str | None
) -> dict[str, Any]:
    return {
        "allowedModels": None if allowed_models is None else list(allowed_models),
        "allowedProviders": None if allowed_providers is None else list(allowed_providers),
        "expiresAt": expires_at,
        "expired": fields.expired(expires_at),
    }


def team_json(team: Team) -> dict[str, Any]:
    return {
        "keyId": team.key_id,
        "teamId": team.team_id,
        "name": team.name,
        "createdAt": team.created_at,
        **governance_json(team.allowed_models, team.allowed_providers, team.expires_at),
    }


def issued_json(key: str, team: Team) -> dict[str, Any]:
    return {"apiKey": key, **team_json(team)}


def new_key_fields(payload: dict[str, Any], known: tuple[str, ...] | None) -> tuple[str, str, fields.Change]:
    """``POST /tokens`` (and ``gateway tokens create``): team id, name, and the key fields."""
    team_id = _text_field(payload, "teamId", MAX_TEAM_ID, required=True)
    assert team_id is not None
    name = _text_field(payload, "name", MAX_NAME, required=False) or team_id
    rest = {k: v for k, v in payload.items() if k not in ("teamId", "name")}
    change = fields.apply(
        rest, fields.KEY_FIELDS, fields.Change(known_providers=known, creating=True), also=("teamId", "name")
    )
    return team_id, name, change


async def issue(teams: TeamDirectory, team_id: str, name: str, change: fields.Change, by: Actor) -> tuple[str, Team]:
    view = change.view
    models, providers = view.get("allowedModels"), view.get("allowedProviders")
    return await teams.issue(
        team_id,
        name,
        by,
        allowed_models=None if models is None else tuple(models),
        allowed_providers=None if providers is None else tuple(providers),
        expires_at=view.get("expiresAt"),
    )


async def create_token(request: Request) -> Response:
    require_admin(request)
    payload = await json_object(request)
    team_id, name, change = new_key_fields(payload, known_providers(request))
    key, team = await issue(_teams(request), team_id, name, change, actor(request))
    return JSONResponse(issued_json(key, team), status_code=201)


async def show_token(request: Request) -> Response:
    teams = _teams(request)
    if teams.degraded:  # the cache may answer auth for a grace period, but the API speaks for the store
        raise StoreUnavailableError("store unavailable")
    team = await teams.resolve(request.path_params["api_key"])
    if team is None:
        raise NotFound(NOT_FOUND_MESSAGE)
    return JSONResponse(team_json(team))


def grace_seconds(payload: dict[str, Any]) -> int | None:
    """A rotation's ``graceSeconds``: a whole number from 0 to 7 days (0 or absent: none)."""
    unknown = [name for name in payload if name != "graceSeconds"]
    if unknown:
        shown = unknown[0] if len(unknown[0]) <= 40 else unknown[0][:40] + "…"
        raise BadRequest(f"Unknown field {shown!r}: expected graceSeconds.")
    value = payload.get("graceSeconds")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= fields.MAX_GRACE_SECONDS:
        raise BadRequest(f"'graceSeconds' must be a whole number from 0 to {fields.MAX_GRACE_SECONDS} (7 days).")
    return value or None


async def refresh_token(request: Request) -> Response:
    admin = is_admin(request)
    if not request.app.state.settings.self_service_rotation and not admin:
        require_admin(request)
    grace = grace_seconds(await json_object(request, empty=True))
    teams = _teams(request)
    api_key = request.path_params["api_key"]
    if not admin:  # a key rotating itself must be a working key: not expired, not a previous secret
        if teams.degraded:
            raise StoreUnavailableError("store unavailable")
        current = await teams.resolve(api_key)
        if current is not None and current.expires is not None and time.time() >= current.expires:
            raise KeyExpired(f"API key expired at {current.expires_at}; it cannot rotate itself.")
    rotated = await teams.rotate(api_key, actor(request, "admin-api" if admin else "key"), grace)
    if rotated is None:
        raise NotFound(NOT_FOUND_MESSAGE)
    key, team = rotated
    return JSONResponse(issued_json(key, team))


async def revoke_token(request: Request) -> Response:
    require_admin(request)
    if not await _teams(request).revoke(request.path_params["api_key"], actor(request)):
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


def record_json(record: TokenRecord) -> dict[str, Any]:
    return {
        "keyId": record.key_id,
        "keyPrefix": record.key_prefix + "…" if record.key_prefix else None,
        "teamId": record.team_id,
        "name": record.name,
        "createdAt": record.created_at,
        "lastUsedAt": record.last_used_at,
        **governance_json(record.allowed_models, record.allowed_providers, record.expires_at),
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
    if not await _teams(request).revoke_id(request.path_params["key_id"], actor(request)):
        raise NotFound(KEY_NOT_FOUND_MESSAGE)
    return Response(status_code=204)


async def revoke_team_keys(request: Request) -> Response:
    """Admin: revoke every key of a team; how many there were (0 is not an error)."""
    require_admin(request)
    team_id = check_text(request.path_params["team_id"], "teamId", MAX_TEAM_ID)
    return JSONResponse({"revoked": await _teams(request).revoke_team(team_id, actor(request))})


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
