"""Key → team resolution with an in-process cache in front of the store.

The request path looks a key up with ``peek`` (a dict read, no await) and only on a miss awaits
``load``, which asks the store once per digest however many requests wait for it. Hits and misses
are both cached, apart: known keys in a map bounded by the number of keys, unknown digests in a
first-in-first-out set of at most ``max_cached_misses``, so a flood of random keys evicts only older
misses, never a known key. Freshness: this process's own writes drop their entries at once; other processes'
writes arrive as store notifications where the store has them (PostgreSQL LISTEN/NOTIFY), and in
any case are noticed by polling the store's change marker every ``refresh_seconds`` (well within the
1-second revocation bound), which empties the cache.

Store outage: when the store stops answering, the cache is kept, so keys already verified keep
working for ``outage_grace_seconds``; unseen keys and the token API get 503 (the store raises
``StoreUnavailableError``). The state is logged once, shown by ``degraded``, and when the store
answers again the cache is emptied and everything carries on, no restart needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import structlog

from service.core import audit, keys
from service.core.audit import Actor
from service.core.store import StoreUnavailableError, Team, TokenRecord, TokenStore
from service.core.store.base import Removed, timestamp_at, utc_timestamp

log = structlog.get_logger("gateway.teams")

UNKNOWN: Final = Team("", "", "")
"""Cached answer for a digest the store does not know."""

MAX_CACHED_MISSES = 10_000
MAX_TRACKED_KEYS = 100_000
MAX_REMEMBERED_DIGESTS = 10_000
LAST_USED_EVERY_SECONDS = 60.0


class TeamDirectory:
    def __init__(
        self,
        store: TokenStore,
        refresh_seconds: float = 0.25,
        outage_grace_seconds: float = 60.0,
        max_cached_misses: int = MAX_CACHED_MISSES,
    ) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.outage_grace_seconds = outage_grace_seconds
        self.max_cached_misses = max_cached_misses
        self.outage_since: float | None = None
        """Monotonic time the store stopped answering; ``None`` while it answers."""
        self._cache: dict[str, Team] = {}
        """Known keys, by digest: at most one entry per key the store holds."""
        self._misses: dict[str, None] = {}
        """Digests the store does not know, oldest first (a dict keeps insertion order)."""
        self._verified: dict[str, None] = {}
        """Digests the store has known in this process, oldest first, kept when the cache is emptied:
        not an authority (the store is), only what tells a real key from a guess when the auth
        middleware holds back an address presenting unknown keys."""
        self.digests: dict[str, str] = {}
        """SHA-256 digests of keys found valid, by the key as presented (``remember``): the request
        path reads a dict here instead of hashing each key again (~9k instructions a request). It
        holds those keys as the requests carrying them do, bounded (``MAX_REMEMBERED_DIGESTS``), and is
        emptied with the cache whenever keys change, so a revoked key does not linger in it."""
        self._loading: dict[str, asyncio.Future[Team]] = {}
        self._marker: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._used: dict[str, float] = {}
        self._pending_use: dict[str, str] = {}
        self._generation = 0
        """Bumped by every invalidation: a lookup that raced one must not cache its answer."""

    @property
    def degraded(self) -> bool:
        return self.outage_since is not None

    async def start(self) -> None:
        self._marker = await self.store.change_marker()
        await self.store.watch(self.changed)
        self._task = asyncio.create_task(self._watch(), name="team-cache-refresh")

    def changed(self, digest: str | None) -> None:
        """A store notification: one key changed, or (``None``) anything may have."""
        if digest is None:
            self.clear()
        else:
            self.forget(digest)

    def forget(self, *digests: str) -> None:
        """Drop what is cached for these digests, and keep in-flight lookups from caching it again."""
        self._generation += 1
        self.digests.clear()
        for digest in digests:
            self._cache.pop(digest, None)
            self._misses.pop(digest, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(StoreUnavailableError):
            await self.flush_use()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        grace_over = False
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                marker = await self.store.change_marker()
            except Exception as exc:  # any failure: the cache must keep being refreshed afterwards
                if not isinstance(exc, StoreUnavailableError):
                    log.error("store_refresh_failed", error=f"{type(exc).__name__}: {exc}")
                if self.outage_since is None:
                    self.outage_since = loop.time()
                    grace_over = False
                    log.error("store_unavailable", error=str(exc), grace_seconds=self.outage_grace_seconds)
                elif not grace_over and loop.time() - self.outage_since > self.outage_grace_seconds:
                    grace_over = True
                    self.clear()
                    log.error("store_outage_grace_over", message="verified keys now get 503 too")
                continue
            if self.outage_since is not None:
                log.info("store_recovered", outage_seconds=round(loop.time() - self.outage_since, 3))
                self.outage_since = None
                self.clear()
            if marker != self._marker:
                self._marker = marker
                self.clear()
            await self.flush_use()

    def used(self, digest: str) -> None:
        """Note that a key was used; ``last_used_at`` is written at most once a minute per key, by
        the refresh task, never on the request path."""
        now = time.monotonic()
        last = self._used.get(digest)
        if last is None or now - last >= LAST_USED_EVERY_SECONDS:
            if len(self._used) >= MAX_TRACKED_KEYS:
                self._used.clear()
            self._used[digest] = now
            self._pending_use[digest] = utc_timestamp()

    async def flush_use(self) -> None:
        if not self._pending_use:
            return
        pending, self._pending_use = self._pending_use, {}
        try:
            await self.store.touch(pending)
        except StoreUnavailableError:
            self._pending_use = pending | self._pending_use  # try again with the next refresh

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._misses.clear()
        self.digests.clear()

    def remember(self, key: str, digest: str) -> None:
        """Keep a valid key's digest for its next requests (``digests``)."""
        if len(self.digests) >= MAX_REMEMBERED_DIGESTS:
            self.digests.clear()
        self.digests[key] = digest

    def peek(self, digest: str) -> Team | None:
        """The cached answer (``UNKNOWN`` for a cached miss), or ``None`` when not cached."""
        team = self._cache.get(digest)
        if team is None and digest in self._misses:
            return UNKNOWN
        return team

    def verified(self, digest: str) -> bool:
        """Whether the store has known this digest in this process (even if since revoked)."""
        return digest in self._verified

    def _remember_miss(self, digest: str) -> None:
        misses = self._misses
        if self.max_cached_misses <= 0:
            return
        while len(misses) >= self.max_cached_misses:
            del misses[next(iter(misses))]  # the oldest miss; known keys are elsewhere
        misses[digest] = None

    async def load(self, digest: str) -> Team:
        """Ask the store (once per digest for all waiters) and cache the answer, unless the cache
        was invalidated while the store was being asked (the answer may predate that change)."""
        pending = self._loading.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Team] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        generation = self._generation
        try:
            team = await self.store.get(digest) or UNKNOWN
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._loading[digest]
        if generation == self._generation:
            if team is UNKNOWN:
                self._remember_miss(digest)
            else:
                self._cache[digest] = team
        if team is not UNKNOWN and digest not in self._verified:
            if len(self._verified) >= MAX_TRACKED_KEYS:
                del self._verified[next(iter(self._verified))]
            self._verified[digest] = None
        future.set_result(team)
        return team

    async def resolve(self, key: str) -> Team | None:
        """The team for a presented key, or ``None`` when it is malformed or unknown."""
        if not keys.is_well_formed(key):
            return None
        digest = keys.digest(key)
        team = self.peek(digest) or await self.load(digest)
        if team is UNKNOWN or (team.grace_until is not None and time.time() >= team.grace_until):
            return None  # unknown, or a previous secret whose grace period is over
        return team

    # Writes (token API, CLI): through to the store, then drop what this process cached, then the
    # audit trail (the change is made first: an audit write that fails leaves it made, and says so).

    async def issue(
        self,
        team_id: str,
        name: str,
        actor: Actor = audit.CLI,
        *,
        allowed_models: tuple[str, ...] | None = None,
        allowed_providers: tuple[str, ...] | None = None,
        expires_at: str | None = None,
    ) -> tuple[str, Team]:
        team = Team(
            team_id=team_id,
            name=name,
            created_at=utc_timestamp(),
            key_id=keys.new_key_id(),
            allowed_models=allowed_models,
            allowed_providers=allowed_providers,
            expires_at=expires_at,
        )
        key = keys.new_key()
        digest = keys.digest(key)
        await self.store.create(digest, team, key[:8])
        self.forget(digest)  # a cached miss for this key would otherwise refuse it
        created = {
            "teamId": team_id,
            "name": name,
            "allowedModels": None if allowed_models is None else list(allowed_models),
            "allowedProviders": None if allowed_providers is None else list(allowed_providers),
            "expiresAt": expires_at,
        }
        changes = audit.diff({}, created)
        await audit.record(self.store, "key.created", actor, team_id=team_id, key_id=team.key_id, changes=changes)
        return key, team

    async def rotate(
        self, key: str, actor: Actor = audit.CLI, grace_seconds: int | None = None
    ) -> tuple[str, Team] | None:
        """A new secret for the same key: same id, team, name and creation time. With
        ``grace_seconds`` the old secret keeps working that long beside the new one."""
        if not keys.is_well_formed(key):
            return None
        new_key = keys.new_key()
        old, new = keys.digest(key), keys.digest(new_key)
        until = timestamp_at(time.time() + grace_seconds) if grace_seconds else None
        team = await self.store.replace(old, new, new_key[:8], until)
        self.forget(old, new)
        if team is None:
            return None
        changes = {"previousSecretUntil": {"before": None, "after": until}}
        await audit.record(self.store, "key.rotated", actor, team_id=team.team_id, key_id=team.key_id, changes=changes)
        return new_key, team

    async def rotate_id(
        self, key_id: str, actor: Actor = audit.CLI, grace_seconds: int | None = None
    ) -> tuple[str, Team] | None:
        """Rotate a key by its id, without its secret (the admin console): as ``rotate``."""
        record = await self.find(key_id)
        if record is None:
            return None
        after: tuple[str, str] | None = None
        while True:  # the key's digest, from its team's listing
            page = await self.store.list(500, after, record.team_id)
            for listed, digest in page:
                if listed.key_id == key_id:
                    new_key = keys.new_key()
                    new = keys.digest(new_key)
                    until = timestamp_at(time.time() + grace_seconds) if grace_seconds else None
                    team = await self.store.replace(digest, new, new_key[:8], until)
                    self.forget(digest, new)
                    if team is None:
                        return None
                    changes = {"previousSecretUntil": {"before": None, "after": until}}
                    await audit.record(
                        self.store, "key.rotated", actor, team_id=team.team_id, key_id=key_id, changes=changes
                    )
                    return new_key, team
            if len(page) < 500:
                return None
            after = (page[-1][0].created_at, page[-1][1])

    async def _revoked(self, removed: list[Removed], actor: Actor) -> None:
        for gone in removed:
            self.forget(*gone.digests)
        events = [
            audit.new_event(
                "key.revoked",
                actor,
                team_id=gone.team_id,
                key_id=gone.key_id,
                changes={"revoked": {"before": False, "after": True}},
            )
            for gone in removed
        ]
        await audit.record_events(self.store, events)

    async def revoke(self, key: str, actor: Actor = audit.CLI) -> bool:
        if not keys.is_well_formed(key):
            return False
        digest = keys.digest(key)
        removed = await self.store.delete(digest)
        self.forget(digest)
        if removed is None:
            return False
        await self._revoked([removed], actor)
        return True

    async def find(self, key_id: str) -> TokenRecord | None:
        """The key with this id (``key_…``), or ``None`` when it is malformed or unknown."""
        if not keys.is_key_id(key_id):
            return None
        return await self.store.find(key_id)

    async def revoke_id(self, key_id: str, actor: Actor = audit.CLI) -> bool:
        """Revoke a key by its id, without its secret."""
        if not keys.is_key_id(key_id):
            return False
        removed = await self.store.delete_id(key_id)
        if removed is None:
            return False
        await self._revoked([removed], actor)
        return True

    async def revoke_team(self, team_id: str, actor: Actor = audit.CLI) -> int:
        """Revoke every key of a team; how many there were."""
        removed = await self.store.delete_team(team_id)
        await self._revoked(removed, actor)
        return len(removed)

    async def update_key(
        self, key_id: str, columns: dict[str, object], changes: dict[str, Any], actor: Actor = audit.CLI
    ) -> TokenRecord | None:
        """Set a key's governance columns (allow-lists, expiry); the key as it now is, or ``None``
        when unknown. ``changes`` is what the audit trail records (``audit.diff`` of the API's views)."""
        if not keys.is_key_id(key_id):
            return None
        if columns:
            digests = await self.store.update_key(key_id, columns)
            if digests is None:
                return None
            self.forget(*digests)
        record = await self.store.find(key_id)
        if record is not None and changes:
            await audit.record(self.store, "key.updated", actor, team_id=record.team_id, key_id=key_id, changes=changes)
        return record

    async def update_team(
        self, team_id: str, columns: dict[str, object], changes: dict[str, Any], actor: Actor = audit.CLI
    ) -> None:
        """Set a team's own settings (its allow-lists), for every key it has and will have."""
        if columns:
            await self.store.update_team(team_id, columns, utc_timestamp())
            self.clear()  # any of this process's cached keys may be the team's
        if changes:
            await audit.record(self.store, "team.updated", actor, team_id=team_id, changes=changes)
