"""Authentication of team keys on provider routes.

The key is taken from ``Authorization: Bearer sk_…`` (OpenAI SDK, curl), ``x-api-key: sk_…``
(Anthropic SDK) or the header the provider's own SDK uses (``x-goog-api-key``, ``api-key``). A
cached key costs a dict read; an uncached one one store query. A missing or unknown key gets a 401
shaped as the provider's error, and nothing reaches the upstream.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import SCOPE_KEY, RequestInfo
from service import keys
from service.errors import AuthenticationFailed, ServiceUnavailable
from service.metrics import Metrics
from service.respond import send_error
from service.store import StoreUnavailableError
from service.teams import UNKNOWN, TeamDirectory

MISSING = AuthenticationFailed(
    "Missing API key: send your gateway key as 'Authorization: Bearer sk_…' or 'x-api-key: sk_…'."
)
INVALID = AuthenticationFailed("Invalid API key: the key is unknown, rotated or revoked.")


def presented_key(headers: list[tuple[bytes, bytes]], key_headers: frozenset[bytes]) -> str | None:
    """The well-formed key the client sent (the bearer first), else whatever it sent (refused), else ``None``."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == b"bearer ":
                bearer = value[7:].strip().decode("latin-1")
        elif name in key_headers:
            api_key = value.strip().decode("latin-1")
    if bearer and keys.is_well_formed(bearer):
        return bearer
    if api_key and keys.is_well_formed(api_key):
        return api_key
    return None if not (bearer or api_key) else ""


class Auth:
    def __init__(self, app: ASGIApp, *, key_headers: tuple[str, ...] = ()) -> None:
        self.app = app
        self.key_headers = frozenset({b"x-api-key", *(h.encode() for h in key_headers)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        key = presented_key(scope["headers"], self.key_headers)
        if not key:  # None: nothing sent; "": nothing that could be a key
            await send_error(send, MISSING if key is None else INVALID, info.error_shape, info.request_id)
            return
        teams: TeamDirectory = scope["state"]["teams"]
        digest = keys.digest(key)
        team = teams.peek(digest)
        metrics: Metrics = scope["state"]["metrics"]
        if team is not None:
            metrics.cache_hits += 1
        else:
            metrics.cache_misses += 1
            try:
                team = await teams.load(digest)
            except StoreUnavailableError:
                error = ServiceUnavailable("The key store is unavailable; try again shortly.")
                await send_error(send, error, info.error_shape, info.request_id)
                return
        if team is UNKNOWN:
            await send_error(send, INVALID, info.error_shape, info.request_id)
            return
        teams.used(digest)
        info.team = team
        await self.app(scope, receive, send)
