"""The store suite, run against both stores (a real SQLite file, the real PostgreSQL), and the key
cache in front of them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service import keys
from service.store import SQLiteStore, StoreUnavailableError, Team, TokenStore
from service.store.postgres import PostgresStore
from service.teams import TeamDirectory


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a SQLite file path, or a PostgreSQL DSN with a schema of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "g.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


async def open_store(location: str | Path) -> TokenStore:
    text = str(location)
    store: TokenStore = PostgresStore(text) if text.startswith("postgresql://") else SQLiteStore(Path(text))
    await store.open()
    return store


async def test_store_round_trip(location: str) -> None:
    store = await open_store(location)
    team = Team("team_1", "Acme", "2025-01-09T12:00:00.000Z")
    await store.create("a" * 64, team, "sk_aaaaa")
    assert await store.get("a" * 64) == team
    assert await store.get("b" * 64) is None
    assert await store.replace("a" * 64, "c" * 64, "sk_ccccc") == team
    assert await store.get("a" * 64) is None
    assert await store.replace("a" * 64, "d" * 64, "sk_ddddd") is None
    assert await store.delete("c" * 64) is True
    assert await store.delete("c" * 64) is False
    await store.close()


async def test_reopening_keeps_data(location: str) -> None:
    store = await open_store(location)
    await store.create("a" * 64, Team("t", "n", "c"), "sk_aaaaa")
    await store.close()
    again = await open_store(location)
    assert await again.get("a" * 64) == Team("t", "n", "c")
    await again.close()


async def test_sqlite_is_in_wal_mode_in_a_new_folder(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "nested" / "g.db")
    await store.open()
    async with store.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)
    await store.close()


async def test_migrations_apply_once_when_many_processes_start_together(location: str) -> None:
    stores = await asyncio.gather(*(open_store(location) for _ in range(10)))
    for store in stores:
        await store.close()
    probe = await open_store(location)
    if isinstance(probe, PostgresStore):
        rows = await probe.pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        state = await probe.pool.fetchval("SELECT count(*) FROM gateway_state")
    else:
        async with probe.db.execute("SELECT version, name FROM schema_migrations ORDER BY version") as cur:
            rows = await cur.fetchall()
        async with probe.db.execute("SELECT count(*) FROM gateway_state") as cur:
            state = (await cur.fetchone())[0]  # type: ignore[index]
    assert [tuple(row) for row in rows] == [(1, "tokens"), (2, "change_counter"), (3, "listing")]
    assert state == 1
    await probe.close()


async def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailableError):
        await open_store(blocker / "g.db")


async def test_change_marker_moves_when_another_connection_writes(location: str) -> None:
    mine, theirs = await open_store(location), await open_store(location)
    before = await mine.change_marker()
    await theirs.create("a" * 64, Team("t", "n", "c"), "sk_aaaaa")
    assert await mine.change_marker() != before
    await mine.close()
    await theirs.close()


async def test_directory_caches_hits_and_misses_and_sees_other_writers(location: str) -> None:
    mine, theirs = await open_store(location), await open_store(location)
    directory = TeamDirectory(mine, refresh_seconds=0.05)
    other = TeamDirectory(theirs, refresh_seconds=0.05)
    await directory.start()
    key, team = await other.issue("team_1", "Acme")
    await asyncio.sleep(0.1)  # the creation's own notification or counter change has been seen
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


async def test_concurrent_misses_ask_the_store_once(location: str) -> None:
    store = await open_store(location)
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


async def test_own_writes_take_effect_at_once(location: str) -> None:
    store = await open_store(location)
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


async def test_postgres_notifications_reach_other_processes_at_once(pg_dsn: str) -> None:
    mine, theirs = await open_store(pg_dsn), await open_store(pg_dsn)
    directory = TeamDirectory(mine, refresh_seconds=60)  # no polling: only NOTIFY can tell it
    other = TeamDirectory(theirs, refresh_seconds=60)
    await directory.start()
    key, team = await other.issue("team_1", "Acme")
    assert await directory.resolve(key) == team
    assert await other.revoke(key) is True
    for _ in range(100):
        if directory.peek(keys.digest(key)) is None:
            break
        await asyncio.sleep(0.01)
    assert await directory.resolve(key) is None
    await directory.stop()
    await mine.close()
    await theirs.close()


async def test_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreUnavailableError):
        await open_store("postgresql://root@127.0.0.1:1/test")


async def test_listing_pages_in_creation_order_and_last_use(location: str) -> None:
    store = await open_store(location)
    for number in range(5):
        team = Team(f"team_{number}", f"Team {number}", f"2025-01-0{number + 1}T00:00:00.000Z")
        await store.create(f"{number}" * 64, team, f"sk_{number}{number}{number}{number}{number}")
    first = await store.list(2)
    assert [record.team_id for record, _ in first] == ["team_0", "team_1"]
    assert first[0][0].key_prefix == "sk_00000" and first[0][0].last_used_at is None
    rest = await store.list(10, after=(first[-1][0].created_at, first[-1][1]))
    assert [record.team_id for record, _ in rest] == ["team_2", "team_3", "team_4"]
    await store.touch({"3" * 64: "2026-01-01T00:00:00.000Z"})
    assert [r.last_used_at for r, _ in await store.list(10) if r.team_id == "team_3"] == ["2026-01-01T00:00:00.000Z"]
    await store.close()


async def test_concurrent_writes_on_one_connection(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store)
    issued = await asyncio.gather(*(directory.issue(f"team_{n}", "n") for n in range(20)))
    assert len({key for key, _ in issued}) == 20
    assert all(await asyncio.gather(*(directory.revoke(key) for key, _ in issued)))
    await store.close()


async def test_a_lookup_racing_a_revocation_does_not_cache_the_old_answer(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store, refresh_seconds=60)
    key, team = await directory.issue("team_race", "Race")
    original = store.get
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_get(digest: str) -> Team | None:
        answer = await original(digest)  # read before the revocation commits…
        entered.set()
        await release.wait()  # …and return after it
        return answer

    store.get = slow_get  # type: ignore[method-assign]
    lookup = asyncio.create_task(directory.resolve(key))
    await entered.wait()
    directory.changed(keys.digest(key))  # the notification of another process's revocation
    release.set()
    assert await lookup == team  # that request was in flight before the revocation
    store.get = original  # type: ignore[method-assign]
    await store.delete(keys.digest(key))
    assert directory.peek(keys.digest(key)) is None  # the stale answer was not cached
    assert await directory.resolve(key) is None
    await store.close()


async def test_last_use_is_written_at_most_once_a_minute_per_key(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "g.db")
    directory = TeamDirectory(store)
    key, _ = await directory.issue("team_1", "Acme")
    digest = keys.digest(key)
    directory.used(digest)
    directory.used(digest)  # again within the minute: nothing more to write
    await directory.flush_use()
    first = [record.last_used_at for record, _ in await store.list(10)]
    assert first[0] is not None
    await asyncio.sleep(0.01)
    directory.used(digest)
    await directory.flush_use()
    assert [record.last_used_at for record, _ in await store.list(10)] == first  # not rewritten
    await store.close()
