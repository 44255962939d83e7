"""Governance in both stores (a real SQLite file, the real PostgreSQL): allow-lists and expiry with
the key, a previous secret accepted until its deadline, team settings, the audit trail (paged,
filtered, never pruned by the usage retention) and expiries recorded once among many processes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from service.core import audit, keys
from service.core.access import Access
from service.core.store import Team, TokenStore
from service.core.store.base import TeamSettings, prune_old_usage, timestamp_at, utc_timestamp
from service.core.store.governance import update_key, update_team
from service.core.teams import TeamDirectory
from tests.service.test_store import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file path, or a PostgreSQL DSN with a schema of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "g.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


async def test_lists_expiry_and_team_settings(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store)
    try:
        key, team = await directory.issue(
            "team_g",
            "G",
            allowed_models=("gpt-4o*",),
            allowed_providers=("openai",),
            expires_at="2999-01-01T00:00:00.000Z",
        )
        found = await directory.resolve(key)
        assert found is not None and found.key_id == team.key_id
        assert found.allowed_models == ("gpt-4o*",) and found.expires_at == "2999-01-01T00:00:00.000Z"
        assert found.access == Access(("gpt-4o*",), ("openai",), None, None)
        assert found.expires is not None and found.expires > 3e10

        await directory.update_team("team_g", {"allowed_models": '["claude*"]'}, {"allowedModels": {}}, audit.CLI)
        assert await store.team_settings("team_g") == TeamSettings(
            "team_g",
            (await store.team_settings("team_g")).updated_at,
            ("claude*",),
            None,  # type: ignore[union-attr]
        )
        again = await directory.resolve(key)
        assert again is not None and again.access is not None and again.access.team_models == ("claude*",)
        assert await store.count_keys("team_g") == 1 and await store.count_keys("team_none") == 0
        assert await store.team_settings("team_none") is None

        record = await directory.update_key(team.key_id, {"allowed_models": None, "allowed_providers": None}, {})
        assert record is not None and record.allowed_models is None
        cleared = await directory.resolve(key)
        assert cleared is not None and cleared.access == Access(None, None, ("claude*",), None)
        assert await directory.update_key("key_0000000000000000", {"expires_at": None}, {}) is None
        assert await directory.update_key("nope", {"expires_at": None}, {}) is None
    finally:
        await store.close()


def test_only_known_columns_can_be_written() -> None:
    with pytest.raises(ValueError, match="digest"):
        update_key({"digest": "x"})
    with pytest.raises(ValueError, match="none"):
        update_team({})


async def test_previous_secret_until_its_deadline(location: str) -> None:
    store = await open_store(location)
    try:
        old, new, newer = (keys.digest(keys.new_key()) for _ in range(3))
        await store.create(old, _team(), "sk_old00")
        soon = timestamp_at(time.time() + 600)
        rotated = await store.replace(old, new, "sk_new00", soon)
        assert rotated is not None and rotated.grace_until is None
        previous = await store.get(old)
        assert previous is not None and previous.key_id == rotated.key_id and previous.grace_until is not None
        # a second rotation replaces the previous secret: one at a time
        assert await store.replace(new, newer, "sk_newer", timestamp_at(1.0)) is not None
        assert await store.get(old) is None
        assert await store.get(new) is None  # its deadline (1970) is over
        gone = await store.delete(newer)
        assert gone is not None and gone.digests == (newer, new)
    finally:
        await store.close()


def _team(expires_at: str | None = None) -> Team:
    return Team("team_p", "P", utc_timestamp(), keys.new_key_id(), expires_at=expires_at)


async def test_the_audit_trail_pages_filters_and_outlives_usage_retention(location: str) -> None:
    store = await open_store(location)
    try:
        made = [
            audit.new_event("key.created", audit.CLI, team_id=f"t{n % 2}", key_id=f"key_{n:016x}", changes={"n": n})
            for n in range(5)
        ]
        made = [dataclasses.replace(event, at=f"2020-01-0{n + 1}T00:00:00.000Z") for n, event in enumerate(made)]
        await audit.record_events(store, made)
        newest = await store.audit(2, None, {}, None, None)
        assert [e.changes["n"] for e in newest] == [4, 3]
        after = (newest[-1].at, newest[-1].id)
        assert [e.changes["n"] for e in await store.audit(10, after, {}, None, None)] == [2, 1, 0]
        assert [e.changes["n"] for e in await store.audit(10, None, {"team_id": "t1"}, None, None)] == [3, 1]
        window = await store.audit(10, None, {"action": "key.created"}, "2020-01-02", "2020-01-04")
        assert [e.changes["n"] for e in window] == [2, 1]
        with pytest.raises(ValueError, match="not an audit filter"):
            await store.audit(10, None, {"digest": "x"}, None, None)
        await prune_old_usage(store, 1)  # everything before yesterday, as the daily prune does
        assert len(await store.audit(10, None, {}, None, None)) == 5
    finally:
        await store.close()


async def test_an_expiry_is_recorded_once_among_processes(location: str) -> None:
    stores = [await open_store(location) for _ in range(3)]
    try:
        for n in range(4):
            await stores[0].create(keys.digest(keys.new_key()), _team(timestamp_at(1.0 + n)), "sk_e0000")
        counts = await asyncio.gather(*(audit.record_expiries(store) for store in stores))
        assert sum(counts) == 4
        assert await audit.record_expiries(stores[0]) == 0
        expired = await stores[0].audit(10, None, {"action": "key.expired"}, None, None)
        assert len(expired) == 4 and {e.actor for e in expired} == {"system"}
    finally:
        for store in stores:
            await store.close()


async def test_revoke_team_forgets_every_secret(tmp_path: Path) -> None:
    store: TokenStore = await open_store(tmp_path / "g.db")
    directory = TeamDirectory(store)
    try:
        key, _ = await directory.issue("team_r", "R")
        new = await directory.rotate(key, audit.CLI, 600)
        assert new is not None
        assert await directory.resolve(key) is not None and await directory.resolve(new[0]) is not None
        assert await directory.revoke_team("team_r") == 1
        assert await directory.resolve(key) is None and await directory.resolve(new[0]) is None
    finally:
        await store.close()
