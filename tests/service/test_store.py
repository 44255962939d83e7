"""The SQLite store and the key cache in front of it, on real database files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service import keys
from service.store import SQLiteStore, StoreUnavailableError, Team
from service.teams import TeamDirectory


async def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    await store.open()
    return store


async def test_store_round_trip(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "g.db")
    team = Team("team_1", "Acme", "2025-01-09T12:00:00.000Z")
    await store.create("a" * 64, team)
    assert await store.get("a" * 64) == team
    assert await store.get("b" * 64) is None
    assert await store.replace("a" * 64, "c" * 64) == team
    assert await store.get("a" * 64) is None
    assert await store.replace("a" * 64, "d" * 64) is None
    assert await store.delete("c" * 64) is True
    assert await store.delete("c" * 64) is False
    await store.close()


async def test_schema_is_created_once_and_reopening_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "g.db"
    store = await open_store(path)
    await store.create("a" * 64, Team("t", "n", "c"))
    await store.close()
    again = await open_store(path)
    assert await again.get("a" * 64) == Team("t", "n", "c")
    async with again.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)
    await again.close()


async def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailableError):
        await open_store(blocker / "g.db")


async def test_change_marker_moves_when_another_connection_writes(tmp_path: Path) -> None:
    mine, theirs = await open_store(tmp_path / "g.db"), await open_store(tmp_path / "g.db")
    before = await mine.change_marker()
    await theirs.create("a" * 64, Team("t", "n", "c"))
    assert await mine.change_marker() != before
    await mine.close()
    await theirs.close()


async def test_directory_caches_hits_and_misses_and_sees_other_writers(tmp_path: Path) -> None:
    mine, theirs = await open_store(tmp_path / "g.db"), await open_store(tmp_path / "g.db")
    directory = TeamDirectory(mine, refresh_seconds=0.05)
    other = TeamDirectory(theirs, refresh_seconds=0.05)
    await directory.start()
    key, team = await other.issue("team_1", "Acme")
    assert await directory.resolve(key) == team
    assert directory.peek(keys.digest(key)) == team  # now served from memory

    unknown = keys.new_key()
    assert await directory.resolve(unknown) is None
    assert directory.peek(keys.digest(unknown)) is not None  # the miss is cached too

    assert await other.revoke(key) is True
    await asyncio.sleep(0.3)  # a few refresh periods: the other process's write is seen
    assert await directory.resolve(key) is None
    await directory.stop()
    await mine.close()
    await theirs.close()


async def test_concurrent_misses_ask_the_store_once(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "g.db")
    calls = 0
    original = store.get

    async def counting_get(digest: str) -> Team | None:
        nonlocal calls
        calls += 1
        return await original(digest)

    store.get = counting_get  # type: ignore[method-assign]
    directory = TeamDirectory(store)
    key, team = await directory.issue("team_1", "Acme")
    results = await asyncio.gather(*(directory.resolve(key) for _ in range(50)))
    assert results == [team] * 50 and calls == 1
    await store.close()


async def test_own_writes_take_effect_at_once(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "g.db")
    directory = TeamDirectory(store, refresh_seconds=60)
    key, team = await directory.issue("team_1", "Acme")
    assert await directory.resolve(key) == team
    rotated = await directory.rotate(key)
    assert rotated is not None
    new_key, same = rotated
    assert same == team
    assert await directory.resolve(key) is None
    assert await directory.resolve(new_key) == team
    assert await directory.revoke(new_key) is True
    assert await directory.resolve(new_key) is None
    assert await directory.rotate("sk_bad") is None and await directory.revoke("sk_bad") is False
    await store.close()
