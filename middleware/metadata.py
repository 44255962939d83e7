"""``cf-aig-metadata``: tell Cloudflare AI Gateway (and its logs) which team made the request.

The header sent upstream is a JSON object of at most 5 scalar entries: ``team_id``, ``team_name``
and ``request_id`` first, then the client's own entries when it sent a valid JSON object (scalar
values only, extras beyond 5 dropped). Limits on the client's part:

* the client's header is at most ``MAX_CLIENT_BYTES`` (1 KiB) as sent; a longer one is dropped whole;
* a key longer than ``MAX_KEY_CHARS`` (64) or a string value longer than ``MAX_VALUE_CHARS`` (256)
  drops that entry;
* a key that could pass for one of ours is dropped: compared after NFKC normalisation, case
  folding, removing invisible format characters and surrounding spaces, and turning spaces and
  ``-`` into ``_`` (``Team_ID``, ``team-id``, ``team_id `` and full-width look-alikes all count);
* an entry holding a gateway key (``sk_`` + 64 hex) is dropped: the key never leaves the gateway.

Invalid or oversized client metadata is dropped and logged, never an error.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Awaitable

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import Team

log = structlog.get_logger("gateway.metadata")

MAX_ENTRIES = 5
MAX_CACHED_TEAMS = 10_000
RESERVED = ("team_id", "team_name", "request_id")
MAX_CLIENT_BYTES = 1024
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 256
_SEPARATORS = re.compile(r"[\s\-]+")
_GATEWAY_KEY = re.compile(r"(?i)sk_[0-9a-f]{64}")


def normalised_key(key: str) -> str:
    """How a client key compares with ours: ``" Team-ID\u200b"`` → ``"team_id"``."""
    folded = unicodedata.normalize("NFKC", key).casefold()
    visible = "".join(char for char in folded if unicodedata.category(char) != "Cf")
    return _SEPARATORS.sub("_", visible.strip())


def _usable(key: str, value: object) -> bool:
    if not isinstance(value, str | int | float | bool) or len(key) > MAX_KEY_CHARS:
        return False
    if isinstance(value, str) and (len(value) > MAX_VALUE_CHARS or _GATEWAY_KEY.search(value)):
        return False
    return normalised_key(key) not in RESERVED and not _GATEWAY_KEY.search(key)


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
    if client is not None and len(client) > MAX_CLIENT_BYTES:
        problem = f"over {MAX_CLIENT_BYTES} bytes"
    elif client is not None:
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
                if _usable(key, value):
                    entries[key] = value
    return header_json(entries), problem


class Metadata:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # the team part of the header, rendered once per team (by its id, with the name it was rendered
        # with: a key's cached Team would be hashed and compared field by field): request ids need no
        # JSON escaping
        self._prefixes: dict[str, tuple[str, str]] = {}

    def _prefix(self, team: Team) -> str:
        found = self._prefixes.get(team.team_id)
        if found is not None and found[0] == team.name:
            return found[1]
        if len(self._prefixes) >= MAX_CACHED_TEAMS:
            self._prefixes.clear()
        rendered = header_json({"team_id": team.team_id, "team_name": team.name})
        prefix = rendered[:-1] + ',"request_id":"'
        self._prefixes[team.team_id] = (team.name, prefix)
        return prefix

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: nothing is left to do once the app is called, so its own coroutine is handed
        # on (one coroutine fewer per request, as in the other hops that only pass a request on)
        info: RequestInfo = scope[SCOPE_KEY]
        team = info.team
        assert team is not None  # Auth comes first
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
        return self.app(scope, receive, send)
