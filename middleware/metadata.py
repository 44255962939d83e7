"""``cf-aig-metadata``: tell Cloudflare AI Gateway (and its logs) which team made the request.

The header sent upstream is a JSON object of at most 5 scalar entries: ``team_id``, ``team_name``
and ``request_id`` first, then the client's own entries when it sent a valid JSON object (scalar
values only, keys colliding with ours ignored, extras beyond 5 dropped). Invalid client metadata is
dropped and logged, never an error.
"""

from __future__ import annotations

import json

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import SCOPE_KEY, RequestInfo
from service.store import Team

log = structlog.get_logger("gateway.metadata")

MAX_ENTRIES = 5
MAX_CACHED_TEAMS = 10_000
RESERVED = ("team_id", "team_name", "request_id")


def header_json(value: dict[str, object]) -> str:
    """JSON for a header value: ASCII only, with DEL and every control character escaped."""
    text = orjson.dumps(value).decode()
    if text.isascii() and "\x7f" not in text:
        return text
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def merge_metadata(team_id: str, team_name: str, request_id: str, client: bytes | None) -> tuple[str, str | None]:
    """The header value to send, and why the client's metadata was dropped (if it was)."""
    entries: dict[str, object] = {"team_id": team_id, "team_name": team_name, "request_id": request_id}
    problem = None
    if client is not None:
        try:
            parsed = orjson.loads(client)
        except orjson.JSONDecodeError:
            parsed, problem = None, "not valid JSON"
        if parsed is not None and not isinstance(parsed, dict):
            problem = "not a JSON object"
        elif isinstance(parsed, dict):
            for key, value in parsed.items():
                if len(entries) >= MAX_ENTRIES:
                    break
                if key in entries:
                    continue
                if isinstance(value, str | int | float | bool):
                    entries[key] = value
    return header_json(entries), problem


class Metadata:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # the team part of the header, rendered once per team: request ids need no JSON escaping
        self._prefixes: dict[Team, str] = {}

    def _prefix(self, team: Team) -> str:
        prefix = self._prefixes.get(team)
        if prefix is None:
            if len(self._prefixes) >= MAX_CACHED_TEAMS:
                self._prefixes.clear()
            rendered = header_json({"team_id": team.team_id, "team_name": team.name})
            prefix = self._prefixes[team] = rendered[:-1] + ',"request_id":"'
        return prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        team: Team = info.team
        client = None
        for name, value in scope["headers"]:
            if name == b"cf-aig-metadata":
                client = value
                break
        if client is None:
            info.metadata = self._prefix(team) + info.request_id + '"}'
        else:
            info.metadata, problem = merge_metadata(team.team_id, team.name, info.request_id, client)
            if problem is not None:
                log.warning("client_metadata_dropped", request_id=info.request_id, reason=problem)
        await self.app(scope, receive, send)
