"""Key → team resolution with an in-process cache in front of the store.

The request path looks a key up with ``peek`` (a dict read, no await) and only on a miss awaits
``load``, which asks the store once per digest however many requests wait for it. Hits and misses
are both cached. Freshness: this process's own writes drop their entries at once; writes by other
processes are noticed by polling the store's change marker every ``refresh_seconds`` (well within
the 1-second revocation bound), which empties the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Final

import structlog

from service import keys
from service.store import StoreUnavailableError, Team, TokenStore

log = structlog.get_logger("gateway.teams")

UNKNOWN: Final = Team("", "", "")
"""Cached answer for a digest the store does not know."""

MAX_CACHED_MISSES = 10_000


def utc_timestamp() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class TeamDirectory:
    def __init__(self, store: TokenStore, refresh_seconds: float = 0.25) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._cache: dict[str, Team] = {}
        self._misses = 0
        self._loading: dict[str, asyncio.Future[Team]] = {}
        self._marker: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._marker = await self.store.change_marker()
        self._task = asyncio.create_task(self._watch(), name="team-cache-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                marker = await self.store.change_marker()
            except StoreUnavailableError:
                continue
            if marker != self._marker:
                self._marker = marker
                self.clear()

    def clear(self) -> None:
        self._cache.clear()
        self._misses = 0

    def peek(self, digest: str) -> Team | None:
        """The cached answer (``UNKNOWN`` for a cached miss), or ``None`` when not cached."""
        return self._cache.get(digest)

    async def load(self, digest: str) -> Team:
        """Ask the store (once per digest for all waiters) and cache the answer."""
        pending = self._loading.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Team] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            team = await self.store.get(digest) or UNKNOWN
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._loading[digest]
        if team is UNKNOWN:
            if self._misses >= MAX_CACHED_MISSES:
                self.clear()
            self._misses += 1
        self._cache[digest] = team
        future.set_result(team)
        return team

    async def resolve(self, key: str) -> Team | None:
        """The team for a presented key, or ``None`` when it is malformed or unknown."""
        if not keys.is_well_formed(key):
            return None
        digest = keys.digest(key)
        team = self._cache.get(digest) or await self.load(digest)
        return None if team is UNKNOWN else team

    # Writes (token API): through to the store, then drop what this process cached.

    async def issue(self, team_id: str, name: str) -> tuple[str, Team]:
        team = Team(team_id=team_id, name=name, created_at=utc_timestamp())
        key = keys.new_key()
        await self.store.create(keys.digest(key), team)
        self.clear()  # a cached miss for this key would otherwise refuse it
        return key, team

    async def rotate(self, key: str) -> tuple[str, Team] | None:
        if not keys.is_well_formed(key):
            return None
        new_key = keys.new_key()
        team = await self.store.replace(keys.digest(key), keys.digest(new_key))
        self.clear()
        return None if team is None else (new_key, team)

    async def revoke(self, key: str) -> bool:
        if not keys.is_well_formed(key):
            return False
        deleted = await self.store.delete(keys.digest(key))
        self.clear()
        return deleted
