"""Authentication of team keys on provider routes, and the brake on key guessing.

The key is taken from ``Authorization: Bearer sk_…`` (OpenAI SDK, curl), ``x-api-key: sk_…``
(Anthropic SDK) or the header the provider's own SDK uses (``x-goog-api-key``, ``api-key``). A
cached valid key costs a dict read and nothing more; an uncached one one store query. A missing or
unknown key gets a 401 shaped as the provider's error, and nothing reaches the upstream.

Key guessing: each client address may present ``UNKNOWN_KEY_LIMIT`` unknown keys a minute that
cost a store query (a key already cached as unknown, such as a revoked key a client keeps retrying,
costs nothing and is not counted). Past that, until its minute is over, its requests with a key not
already known to be valid get a 429 (with ``retry-after``) without a store query; keys this process
has seen valid keep working (even just after the cache was emptied by a write), so a guessing
neighbour behind the same address never locks out a real key. The address is the
connection's peer, or, when the peer is one of ``TRUSTED_PROXIES``, the right-most
``X-Forwarded-For`` entry that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Sequence

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import SCOPE_KEY, RequestInfo
from service import keys
from service.errors import AuthenticationFailed, ServiceUnavailable, TooManyRequests, render
from service.metrics import Metrics
from service.respond import send_error
from service.store import StoreUnavailableError
from service.teams import UNKNOWN, TeamDirectory

log = structlog.get_logger("gateway.auth")

MISSING = AuthenticationFailed(
    "Missing API key: send your gateway key as 'Authorization: Bearer sk_…' or 'x-api-key: sk_…'."
)
INVALID = AuthenticationFailed("Invalid API key: the key is unknown, rotated or revoked.")
FLOODING = TooManyRequests("Too many unknown API keys from this address; try again later.")

WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 100_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnknownKeyGuard:
    """Unknown-key attempts per client address, in fixed windows of ``window_seconds``.

    At most ``max_addresses`` windows are kept: expired ones are dropped as new addresses arrive,
    and past the bound the oldest goes first.
    """

    def __init__(
        self,
        limit: int,
        trusted_proxies: Sequence[str] = (),
        *,
        window_seconds: float = WINDOW_SECONDS,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_addresses = max_addresses
        self.clock = clock
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)
        self._windows: dict[str, list[float]] = {}
        """Address → [window start, attempts], oldest window first."""

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def address(self, scope: Scope) -> str:
        """The client's address: the peer, or behind a trusted proxy the address it forwarded."""
        client = scope.get("client")
        peer: str = client[0] if client else ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        forwarded = [
            part.strip()
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
            for part in value.decode("latin-1").split(",")
        ]
        for candidate in reversed(forwarded):
            try:
                ip = ipaddress.ip_address(candidate)
            except ValueError:
                return peer  # not an address: nothing right of it is worth trusting
            if not any(ip in network for network in self.trusted):
                return str(ip)
        return peer

    def retry_after(self, address: str) -> float | None:
        """Seconds until the address may try unknown keys again, or ``None`` when it may now."""
        entry = self._windows.get(address)
        if entry is None or entry[1] < self.limit:
            return None
        left = entry[0] + self.window_seconds - self.clock()
        return left if left > 0 else None

    def unknown(self, address: str) -> None:
        """Count an unknown key from ``address``; log once per window when it reaches the limit."""
        now = self.clock()
        windows = self._windows
        entry = windows.get(address)
        if entry is None or now - entry[0] >= self.window_seconds:
            if entry is not None:
                del windows[address]  # re-inserted last: the dict stays ordered by window start
            self._make_room(now)
            entry = windows[address] = [now, 0]
        entry[1] += 1
        if entry[1] == self.limit:
            log.warning(
                "unknown_key_flood",
                address=address,
                limit=self.limit,
                window_seconds=self.window_seconds,
                retry_after=math.ceil(entry[0] + self.window_seconds - now),
            )

    def _make_room(self, now: float) -> None:
        windows = self._windows
        while windows:
            oldest = next(iter(windows))
            if now - windows[oldest][0] < self.window_seconds and len(windows) < self.max_addresses:
                break
            del windows[oldest]

    def __len__(self) -> int:
        return len(self._windows)


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


async def send_too_many(send: Send, info: RequestInfo, wait: float) -> None:
    body = render(FLOODING, info.error_shape, info.request_id)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, math.ceil(wait))).encode()),
    ]
    await send({"type": "http.response.start", "status": FLOODING.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
        state = scope["state"]
        teams: TeamDirectory = state["teams"]
        digest = keys.digest(key)
        team = teams.peek(digest)
        metrics: Metrics = state["metrics"]
        if team is None or team is UNKNOWN:  # not known to be valid: the guessing brake applies
            guard: UnknownKeyGuard | None = state.get("guard")
            address = None
            if guard is not None and guard.limit > 0:
                address = guard.address(scope)
                wait = guard.retry_after(address)
                if wait is not None and not teams.verified(digest):
                    await send_too_many(send, info, wait)
                    return
            if team is None:
                metrics.cache_misses += 1
                try:
                    team = await teams.load(digest)
                except StoreUnavailableError:
                    error = ServiceUnavailable("The key store is unavailable; try again shortly.")
                    await send_error(send, error, info.error_shape, info.request_id)
                    return
                if team is UNKNOWN and address is not None and guard is not None:
                    guard.unknown(address)  # a store query spent on a key nobody has
            else:
                metrics.cache_hits += 1
            if team is UNKNOWN:
                await send_error(send, INVALID, info.error_shape, info.request_id)
                return
        else:
            metrics.cache_hits += 1
        teams.used(digest)
        info.team = team
        await self.app(scope, receive, send)
