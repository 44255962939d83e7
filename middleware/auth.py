"""Authentication of team keys on provider routes.

The key is taken from ``Authorization: Bearer sk_…`` (OpenAI SDK, curl), ``x-api-key: sk_…``
(Anthropic SDK) or the header the provider's own SDK uses (``x-goog-api-key``, ``api-key``). A
cached valid key costs two dict reads (its digest, remembered once the key was found valid, and its
team) and nothing more; an uncached one one store query. A missing or unknown key is refused with a
401 (raised: the error boundary shapes it as the provider's error), and nothing reaches the
upstream; a store it cannot reach raises ``StoreUnavailableError`` (503).

The brake on key guessing (``UNKNOWN_KEY_LIMIT``) is ``middleware.key_guard``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Container

from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.key_guard import UnknownKeyGuard
from service.core import keys
from service.core.errors import AuthenticationFailed, KeyExpired, TooManyRequests
from service.core.metrics import Metrics
from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import Team
from service.core.teams import UNKNOWN, TeamDirectory

MISSING = AuthenticationFailed(
    "Missing API key: send your gateway key as 'Authorization: Bearer sk_…' or 'x-api-key: sk_…'."
)
INVALID = AuthenticationFailed("Invalid API key: the key is unknown, rotated or revoked.")
FLOODING = "Too many unknown API keys from this address; try again later."


def check_deadlines(team: Team) -> None:
    """Refuse a key past its expiry (401 "expired", not "unknown"), or a previous secret past its
    rotation's grace period (401 as any rotated key)."""
    now = time.time()
    if team.expires is not None and now >= team.expires:
        raise KeyExpired(f"API key expired at {team.expires_at} (keyId {team.key_id}); ask for a new key.")
    if team.grace_until is not None and now >= team.grace_until:
        raise INVALID


def presented_key(
    headers: list[tuple[bytes, bytes]], key_headers: frozenset[bytes], known: Container[str] = ()
) -> str | None:
    """The well-formed key the client sent (the bearer first), else whatever it sent (refused), else
    ``None``. A key in ``known`` (the keys found valid before: well-formed) skips the format check,
    a regular expression that costs ~4.5k instructions where the lookup costs ~0.4k."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == b"bearer ":
                bearer = value[7:].strip().decode("latin-1")
        elif name in key_headers:
            api_key = value.strip().decode("latin-1")
    if bearer and (bearer in known or keys.is_well_formed(bearer)):
        return bearer
    if api_key and (api_key in known or keys.is_well_formed(api_key)):
        return api_key
    return None if not (bearer or api_key) else ""


def too_many(wait: float) -> TooManyRequests:
    retry_after = str(max(1, math.ceil(wait))).encode()
    return TooManyRequests(FLOODING, headers=[(b"retry-after", retry_after)])


class Auth:
    def __init__(self, app: ASGIApp, *, key_headers: tuple[str, ...] = ()) -> None:
        self.app = app
        self.key_headers = frozenset({b"x-api-key", *(h.encode() for h in key_headers)})

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: a key found valid before (the usual request) is let through without a
        # coroutine of this hop (``middleware.metadata``); any other goes through ``verify``
        info: RequestInfo = scope[SCOPE_KEY]
        state = scope["state"]
        teams: TeamDirectory = state["teams"]
        key = presented_key(scope["headers"], self.key_headers, teams.digests)
        if not key:  # None: nothing sent; "": nothing that could be a key
            raise MISSING if key is None else INVALID
        digest = teams.digests.get(key)
        hashed = digest is None
        if digest is None:
            digest = keys.digest(key)
        team = teams.peek(digest)
        if team is None or team is UNKNOWN:  # not known to be valid: the guessing brake applies
            return self.verify(scope, receive, send, key, digest, hashed, team)
        metrics: Metrics = state["metrics"]
        metrics.cache_hits += 1
        accept(info, teams, team, key, digest, hashed)
        return self.app(scope, receive, send)

    async def verify(
        self, scope: Scope, receive: Receive, send: Send, key: str, digest: str, hashed: bool, team: Team | None
    ) -> None:
        """A key not cached as valid: the guessing brake, then the store (when not cached as unknown)."""
        state = scope["state"]
        teams: TeamDirectory = state["teams"]
        metrics: Metrics = state["metrics"]
        guard: UnknownKeyGuard | None = state.get("guard")
        address = None
        if guard is not None and guard.limit > 0:
            address = guard.address(scope)
            wait = guard.retry_after(address)
            if wait is not None and not teams.verified(digest):
                raise too_many(wait)
        if team is None:
            metrics.cache_misses += 1
            team = await teams.load(digest)
            if team is UNKNOWN and address is not None and guard is not None:
                guard.unknown(address)  # a store query spent on a key nobody has
        else:
            metrics.cache_hits += 1
        if team is UNKNOWN:
            raise INVALID
        accept(scope[SCOPE_KEY], teams, team, key, digest, hashed)
        await self.app(scope, receive, send)


def accept(info: RequestInfo, teams: TeamDirectory, team: Team, key: str, digest: str, hashed: bool) -> None:
    """A valid key's request goes on as its team's (unless past a deadline)."""
    if team.expires is not None or team.grace_until is not None:
        check_deadlines(team)
    if hashed:
        teams.remember(key, digest)
    teams.used(digest)
    info.team = team
