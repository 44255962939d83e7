"""``cf-aig-metadata``: tell Cloudflare AI Gateway (and its logs) which team made the request.

The header sent upstream is a JSON object of at most 5 scalar entries: ``team_id``, ``team_name``
and ``request_id`` first, then the client's own entries when it sent a valid JSON object (scalar
values only, keys colliding with ours ignored, extras beyond 5 dropped). Invalid client metadata is
dropped and logged, never an error.
"""

from __future__ import annotations

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import request_info

log = structlog.get_logger("gateway.metadata")

MAX_ENTRIES = 5
RESERVED = ("team_id", "team_name", "request_id")


def merge_metadata(
    team_id: str, team_name: str, request_id: str, client: bytes | None
) -> tuple[str, str | None]:
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
    return orjson.dumps(entries).decode(), problem


class Metadata:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = request_info(scope)
        client = None
        for name, value in scope["headers"]:
            if name == b"cf-aig-metadata":
                client = value
                break
        team = info.team
        info.metadata, problem = merge_metadata(team.team_id, team.name, info.request_id, client)
        if problem is not None:
            log.warning("client_metadata_dropped", request_id=info.request_id, reason=problem)
        await self.app(scope, receive, send)
