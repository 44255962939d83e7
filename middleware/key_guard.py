"""The brake on key guessing, per client address.

Each client address may present ``UNKNOWN_KEY_LIMIT`` unknown keys a minute that
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
from starlette.types import Scope

log = structlog.get_logger("gateway.auth")

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
