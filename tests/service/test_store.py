"""The store suite, run against both stores (a real SQLite file, the real PostgreSQL), and the key
cache in front of them."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import asyncpg
import pytest
from yarl import URL

from service.core import keys
from service.core.ledger import Ledger, LedgerRow
from service.core.limits.model import Limits
from service.core.request import new_request_id
from service.core.store import SQLiteStore, StoreUnavailableError, Team, TokenStore
from service.core.store.base import MAX_MESSAGE, prune_old_usage, retention_start, unavailable_on
from service.core.store.migrations import CREATE_TABLE, migrations
from service.core.store.postgres import PostgresStore
from service.core.store.usage import FAILURES, PRUNE, prune_params, range_params, report_query
from service.core.teams import UNKNOWN, TeamDirectory
from tests.postgres import PG_ROOT
from tests.support import eventually

KEY_ID_RE = re.compile(r"key_[0-9a-f]{16}")


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


async def settle(directory: TeamDirectory, other: TokenStore) -> None:
    """Return once ``directory`` has taken in every write made before the call, by another store.

    A miss is cached for a fresh key, then that key is written through ``other``: the miss goes once
    the directory has seen the write (a notification, or the change marker), and every earlier one
    with it. Twice, so that a PostgreSQL listener's first "anything may have changed" is behind us
    too. Afterwards only new writes change what the directory holds."""
    rounds = 0
    while rounds < 2:
        probe = keys.new_key()
        assert await directory.resolve(probe) is None
        if directory.peek(keys.digest(probe)) is None:  # a refresh raced the lookup: go again
            continue
        await other.create(keys.digest(probe), Team("team_probe", "Probe", "c", keys.new_key_id()), probe[:8])
        await eventually(lambda probe=probe: directory.peek(keys.digest(probe)) is None, 10, "the probe write seen")
        rounds += 1


async def cached(directory: TeamDirectory, key: str) -> Team | None:
    """Look ``key`` up; what the directory then holds for it, without asking the store."""
    await directory.resolve(key)
    return directory.peek(keys.digest(key))


async def test_store_round_trip(location: str) -> None:
    store = await open_store(location)
    team = Team("team_1", "Acme", "2025-01-09T12:00:00.000Z", "key_0123456789abcdef")
    await store.create("a" * 64, team, "sk_aaaaa")
    assert await store.get("a" * 64) == team
    assert await store.get("b" * 64) is None
    assert await store.replace("a" * 64, "c" * 64, "sk_ccccc") == team  # the same key id after rotation
    record = await store.find("key_0123456789abcdef")
    assert record is not None and (record.key_prefix, record.team_id, record.key_id) == (
        "sk_ccccc",
        "team_1",
        "key_0123456789abcdef",
    )
    assert await store.get("a" * 64) is None
    assert await store.replace("a" * 64, "d" * 64, "sk_ddddd") is None
    assert await store.delete("c" * 64) is not None
    assert await store.delete("c" * 64) is None
    await store.close()


async def test_reopening_keeps_data(location: str) -> None:
    store = await open_store(location)
    await store.create("a" * 64, Team("t", "n", "c", "key_aaaaaaaaaaaaaaaa"), "sk_aaaaa")
    await store.close()
    again = await open_store(location)
    assert await again.get("a" * 64) == Team("t", "n", "c", "key_aaaaaaaaaaaaaaaa")
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
    dialect = "postgresql" if isinstance(probe, PostgresStore) else "sqlite"
    assert [tuple(row) for row in rows] == [(m.version, m.name) for m in migrations(dialect)]
    assert [tuple(row) for row in rows] == [
        (1, "tokens"),
        (2, "change_counter"),
        (3, "listing"),
        (4, "key_ids"),
        (5, "usage_ledger"),
        (6, "ledger_indexes"),
        (7, "limits"),
        (8, "governance"),
        (9, "ledger_time_by_id"),
    ]
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
    await theirs.create("a" * 64, Team("t", "n", "c", "key_aaaaaaaaaaaaaaaa"), "sk_aaaaa")
    assert await mine.change_marker() != before
    await mine.close()
    await theirs.close()


async def test_directory_caches_hits_and_misses_and_sees_other_writers(location: str) -> None:
    mine, theirs = await open_store(location), await open_store(location)
    directory = TeamDirectory(mine, refresh_seconds=0.05)
    other = TeamDirectory(theirs, refresh_seconds=0.05)
    await directory.start()
    key, team = await other.issue("team_1", "Acme")
    await settle(directory, theirs)  # the creation's own notification or counter change has been seen
    assert await directory.resolve(key) == team
    # now served from memory (polled: on PostgreSQL a counter change can still clear the cache once)
    await eventually(lambda: cached(directory, key), what="the key cached")
    assert directory.peek(keys.digest(key)) == team

    unknown = keys.new_key()
    assert await directory.resolve(unknown) is None
    await eventually(lambda: cached(directory, unknown), what="the miss cached")
    assert directory.peek(keys.digest(unknown)) is not None  # the miss is cached too

    assert await other.revoke(key) is True
    # the other process's write is seen within a few refresh periods
    await eventually(lambda: directory.peek(keys.digest(key)) is None, 5, "the revocation seen")
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
    await settle(directory, theirs)  # the creation's notification is behind us: it cannot drop the key later
    assert await directory.resolve(key) == team
    assert directory.peek(keys.digest(key)) == team  # the cache holds the key…
    assert await other.revoke(key) is True
    # …until the revocation's notification drops it, long before the 60 s poll would
    await eventually(lambda: directory.peek(keys.digest(key)) is None, 5, "the revocation's notification")
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
        team = Team(
            f"team_{number % 2}", f"Team {number}", f"2025-01-0{number + 1}T00:00:00.000Z", f"key_{number:016x}"
        )
        await store.create(f"{number}" * 64, team, f"sk_{number}{number}{number}{number}{number}")
    first = await store.list(2)
    assert [record.name for record, _ in first] == ["Team 0", "Team 1"]
    assert first[0][0].key_prefix == "sk_00000" and first[0][0].last_used_at is None
    assert first[0][0].key_id == "key_0000000000000000"
    rest = await store.list(10, after=(first[-1][0].created_at, first[-1][1]))
    assert [record.name for record, _ in rest] == ["Team 2", "Team 3", "Team 4"]
    team_0 = await store.list(2, team_id="team_0")
    assert [record.name for record, _ in team_0] == ["Team 0", "Team 2"]
    after = (team_0[-1][0].created_at, team_0[-1][1])
    assert [record.name for record, _ in await store.list(2, after=after, team_id="team_0")] == ["Team 4"]
    await store.touch({"3" * 64: "2026-01-01T00:00:00.000Z"})
    assert [r.last_used_at for r, _ in await store.list(10) if r.name == "Team 3"] == ["2026-01-01T00:00:00.000Z"]
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
    await asyncio.sleep(0.01)  # time moves on (timestamps are in ms): a rewrite would show
    directory.used(digest)
    await directory.flush_use()
    assert [record.last_used_at for record, _ in await store.list(10)] == first  # not rewritten
    await store.close()


async def test_existing_keys_get_a_random_unique_key_id_by_migration(location: str) -> None:
    """A database at schema 3 (keys without ids) gets an id for each key when a store opens it."""
    before_ids = [m for m in migrations("postgresql" if location.startswith("postgresql://") else "sqlite")][:3]
    rows = [(f"{n}" * 64, f"team_{n}", "n", f"2025-01-0{n + 1}T00:00:00.000Z", "sk_xxxxx") for n in range(3)]
    insert = "INSERT INTO tokens (digest, team_id, name, created_at, key_prefix) VALUES "
    if location.startswith("postgresql://"):
        conn = await asyncpg.connect(location)
        await conn.execute(CREATE_TABLE)
        for migration in before_ids:
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2, 'then')", migration.version, migration.name
            )
        await conn.executemany(insert + "($1, $2, $3, $4, $5)", rows)
        await conn.close()
    else:
        async with aiosqlite.connect(location) as db:
            await db.execute(CREATE_TABLE)
            for migration in before_ids:
                for statement in migration.statements:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, 'then')", (migration.version, migration.name)
                )
            await db.executemany(insert + "(?, ?, ?, ?, ?)", rows)
            await db.commit()
    store = await open_store(location)
    listed = await store.list(10)
    ids = [record.key_id for record, _ in listed]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(KEY_ID_RE.fullmatch(i) for i in ids)
    assert all(i != "key_" + digest[:16] for i, (_, digest) in zip(ids, listed, strict=True))  # not derived
    team = await store.get("0" * 64)
    assert team is not None and team.key_id == ids[0]
    with pytest.raises(StoreUnavailableError):  # key ids are unique
        await store.create("9" * 64, Team("t", "n", "c", ids[0]), "sk_99999")
    await store.close()


async def test_key_ids_survive_rotation_and_revoke_without_the_key(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store, refresh_seconds=60)
    key, team = await directory.issue("team_1", "Acme")
    assert KEY_ID_RE.fullmatch(team.key_id)
    rotated = await directory.rotate(key)
    assert rotated is not None and rotated[1].key_id == team.key_id
    new_key = rotated[0]
    record = await directory.find(team.key_id)
    assert record is not None and record.key_prefix == new_key[:8] and record.team_id == "team_1"
    assert await directory.resolve(new_key) == team  # cached now
    assert await directory.revoke_id(team.key_id) is True
    assert directory.peek(keys.digest(new_key)) is None  # dropped from the cache at once
    assert await directory.resolve(new_key) is None
    assert await directory.revoke_id(team.key_id) is False
    assert await directory.find(team.key_id) is None
    assert await directory.find("key_bad") is None and await directory.revoke_id("sk_" + "0" * 64) is False
    await store.close()


async def test_revoking_a_team_revokes_all_its_keys(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store, refresh_seconds=60)
    mine = [await directory.issue("team_a", "A") for _ in range(3)]
    other, other_team = await directory.issue("team_b", "B")
    for key, team in mine:
        assert await directory.resolve(key) == team
    assert await directory.revoke_team("team_a") == 3
    assert [await directory.resolve(key) for key, _ in mine] == [None, None, None]
    assert await directory.resolve(other) == other_team
    assert await directory.revoke_team("team_a") == 0
    await store.close()


@pytest.mark.parametrize("several", [False, True])
async def test_revocations_by_id_and_team_reach_other_processes(location: str, several: bool) -> None:
    """PostgreSQL: by NOTIFY alone (no polling); SQLite: by the change counter."""
    postgres = location.startswith("postgresql://")
    mine, theirs = await open_store(location), await open_store(location)
    directory = TeamDirectory(mine, refresh_seconds=60 if postgres else 0.05)
    other = TeamDirectory(theirs, refresh_seconds=60)
    await directory.start()
    issued = [await other.issue("team_n", "N") for _ in range(3 if several else 1)]
    await settle(directory, theirs)  # the creations are behind us: only the revocation can drop the keys now
    for key, team in issued:
        assert await directory.resolve(key) == team
    digests = [keys.digest(key) for key, _ in issued]
    assert [directory.peek(digest) for digest in digests] == [team for _, team in issued]  # cached
    if several:
        assert await other.revoke_team("team_n") == 3
    else:
        assert await other.revoke_id(issued[0][1].key_id) is True
    await eventually(
        lambda: all(directory.peek(digest) is None for digest in digests), 5, "the revocation reaching the cache"
    )
    assert all([await directory.resolve(key) is None for key, _ in issued])
    await directory.stop()
    await mine.close()
    await theirs.close()


async def test_a_flood_of_unknown_keys_never_evicts_known_ones(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store, refresh_seconds=60, max_cached_misses=10)
    key, team = await directory.issue("team_1", "Acme")
    assert await directory.resolve(key) == team
    unknown = [keys.new_key() for _ in range(50)]
    for guess in unknown:
        assert await directory.resolve(guess) is None
    assert directory.peek(keys.digest(key)) == team  # still a dict read, no store query
    cached = [directory.peek(keys.digest(guess)) for guess in unknown]
    assert cached[-10:] == [UNKNOWN] * 10 and cached[:40] == [None] * 40  # only the newest misses are kept
    await store.close()


async def test_last_use_lands_however_the_writes_around_it_end(location: str) -> None:
    """``touch`` interleaved with writes that commit and writes that fail (and roll back): every
    write that should land lands, and every ``last_used_at`` lands, whatever the writes beside it do."""
    store = await open_store(location)
    try:
        existing = [(f"{n:064x}", Team(f"team_{n}", "n", "c", f"key_{n:016x}")) for n in range(10)]
        for digest, team in existing:
            await store.create(digest, team, "sk_xxxxx")

        async def duplicate(n: int) -> str:
            digest, team = existing[n]
            try:
                await store.create(digest, team, "sk_xxxxx")  # the digest and id are taken: rolled back
            except StoreUnavailableError:
                return "refused"
            return "stored twice"

        async def create(n: int) -> str:
            await store.create(f"{100 + n:064x}", Team(f"team_{n}", "n", "c", f"key_{100 + n:016x}"), "sk_yyyyy")
            return "created"

        async def touch(n: int) -> str:
            await store.touch({existing[n][0]: f"2026-01-01T00:00:{n:02d}.000Z"})
            return "touched"

        outcomes = await asyncio.gather(
            *(operation(n) for n in range(10) for operation in (duplicate, touch, create)), return_exceptions=True
        )
        assert outcomes == ["refused", "touched", "created"] * 10
        for n in range(10):
            assert await store.get(f"{100 + n:064x}") == Team(f"team_{n}", "n", "c", f"key_{100 + n:016x}")
        last_used = {record.key_id: record.last_used_at for record, _ in await store.list(100)}
        assert [last_used[team.key_id] for _, team in existing] == [f"2026-01-01T00:00:{n:02d}.000Z" for n in range(10)]
    finally:
        await store.close()


def test_driver_errors_become_short_store_errors_without_secrets() -> None:
    mapping = unavailable_on(sqlite3.Error, OSError, hide=["s3cret-password", None, ""])
    with pytest.raises(StoreUnavailableError) as raised, mapping("cannot open"):
        raise sqlite3.OperationalError("no s3cret-password here")
    assert str(raised.value) == "cannot open: OperationalError: no *** here"
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreUnavailableError) as raised, mapping:
        raise ConnectionRefusedError("x" * 10_000)
    assert str(raised.value).startswith("ConnectionRefusedError: xxx") and len(str(raised.value)) == MAX_MESSAGE
    with pytest.raises(KeyError), mapping:  # not a database error: untouched
        raise KeyError("digest")
    with mapping:  # no error, nothing to map
        pass


async def test_a_postgres_error_names_the_failure_never_the_password(pg_dsn: str) -> None:
    dsn = str(URL(PG_ROOT).with_password("pa55-never-logged").with_path("/no_such_database"))
    with pytest.raises(StoreUnavailableError) as raised:
        await open_store(dsn)
    message = str(raised.value)
    assert message.startswith("cannot open the PostgreSQL store: ") and "no_such_database" in message
    assert "pa55-never-logged" not in message and dsn not in message


async def test_a_sqlite_write_waiting_for_the_lock_holds_up_no_read(tmp_path: Path) -> None:
    """Another process holds the write lock: a write waits for it, reads are answered meanwhile."""
    store = SQLiteStore(tmp_path / "g.db")
    await store.open()
    known = Team("team_1", "n", "c", "key_aaaaaaaaaaaaaaaa")
    await store.create("a" * 64, known, "sk_aaaaa")
    other = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        marker = await store.change_marker()
        writing = asyncio.create_task(store.create("b" * 64, Team("team_2", "n", "c", "key_bbbbbbbbbbbbbbbb"), "sk_b"))
        for _ in range(1000):  # until the write has its turn on the writing connection (then it waits)
            if store._writing.locked():
                break
            await asyncio.sleep(0)
        assert store._writing.locked()
        assert await store.get("a" * 64) == known
        assert await store.find("key_aaaaaaaaaaaaaaaa") is not None
        assert [record.team_id for record, _ in await store.list(10)] == ["team_1"]
        assert await store.change_marker() == marker
        await store.ping()
        assert not writing.done()  # all of that was answered while the write still waited
        other.execute("ROLLBACK")
        await writing
        assert await store.get("b" * 64) == Team("team_2", "n", "c", "key_bbbbbbbbbbbbbbbb")
        assert await store.change_marker() != marker
    finally:
        other.close()
        await store.close()


def gateway_id(at: str, n: int) -> str:
    """A request id as the gateway makes them (``new_request_id``) for a request made at ``at``."""
    moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    return new_request_id(int(moment.timestamp()) * 1000 + moment.microsecond // 1000)[:12] + f"{n:020x}"


def usage(n: int, at: str = "2026-11-02T10:15:00.000Z", **fields: object) -> LedgerRow:
    """A ledger row for request ``n``: priced, every count known, unless ``fields`` say otherwise.
    Even requests have ids as the gateway makes them (their time first: SQLite finds time ranges by
    them), odd ones ids of another shape (as rows written before that): every report, lookup and
    pruning below reads both."""
    row = LedgerRow(
        request_id=gateway_id(at, n) if n % 2 == 0 else f"req_{n:08d}",
        client_request_id=None,
        at=at,
        team_id="team_1",
        key_id="key_aaaaaaaaaaaaaaaa",
        provider="openai",
        model="gpt-4o",
        status=200,
        input_tokens=100 + n,
        output_tokens=20 + n,
        cache_read_tokens=n,
        cache_write_tokens=0,
        reasoning_tokens=None,
        cost_micro_usd=1_000 + n,
        duration_ms=12.5,
        ttfb_ms=3.25,
        complete=True,
    )
    return row._replace(**fields)


SUMS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "cacheReadTokens": "cache_read_tokens",
    "cacheWriteTokens": "cache_write_tokens",
    "reasoningTokens": "reasoning_tokens",
}
GROUP_OF = {
    "hour": lambda row: row.at[:13] + ":00:00Z",
    "day": lambda row: row.at[:10],
    "team": lambda row: row.team_id,
    "key": lambda row: row.key_id,
    "provider": lambda row: row.provider,
    "model": lambda row: row.model,
}
FIELD = {"hour": "hour", "day": "day", "team": "teamId", "key": "keyId", "provider": "provider", "model": "model"}


def expected_report(
    rows: Sequence[LedgerRow], start: str, end: str, group_by: Sequence[str], filters: dict[str, str] | None = None
) -> list[dict[str, object]]:
    """The report worked out in Python from the rows themselves."""
    groups: dict[tuple[object, ...], list[LedgerRow]] = {}
    for row in rows:
        if start <= row.at < end and all(getattr(row, name) == value for name, value in (filters or {}).items()):
            groups.setdefault(tuple(GROUP_OF[name](row) for name in group_by), []).append(row)
    report = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        members = groups[key]
        priced = [row.cost_micro_usd for row in members if row.cost_micro_usd is not None]
        entry: dict[str, object] = {FIELD[name]: value for name, value in zip(group_by, key, strict=True)}
        entry["requests"] = len(members)
        for field, column in SUMS.items():
            entry[field] = sum(getattr(row, column) or 0 for row in members)
        entry["costMicroUsd"] = sum(priced) if priced else None
        entry["unpricedRequests"] = len(members) - len(priced)
        report.append(entry)
    return report


def mixed_rows() -> list[LedgerRow]:
    """Rows over three days and several hours, two teams, three keys, three providers, four models
    (one missing), some unpriced, some without counts."""
    rows = []
    teams = [("team_1", "key_aaaaaaaaaaaaaaaa"), ("team_1", "key_bbbbbbbbbbbbbbbb"), ("team_2", "key_cccccccccccccccc")]
    models = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"), ("acme", None)]
    for n in range(60):
        team_id, key_id = teams[n % 3]
        provider, model = models[n % 4]
        at = f"2026-11-0{1 + n % 3}T{(n * 7) % 24:02d}:{n % 60:02d}:00.{n:03d}Z"
        cost = None if model is None or n % 5 == 0 else 1_000 * n + 7
        counts = {"input_tokens": None, "output_tokens": None} if n % 11 == 0 else {}
        rows.append(
            usage(n, at, team_id=team_id, key_id=key_id, provider=provider, model=model, cost_micro_usd=cost, **counts)
        )
    return rows


async def test_usage_rows_are_recorded_whole_and_read_back(location: str) -> None:
    store = await open_store(location)
    row = usage(1, client_request_id="client-42", reasoning_tokens=7, ttfb_ms=None, complete=False, status=502)
    unpriced = usage(2, model=None, cost_micro_usd=None, input_tokens=None, output_tokens=None)
    await store.record_usage([row, unpriced])
    assert await store.usage_request(row.request_id) == row
    assert await store.usage_request(unpriced.request_id) == unpriced
    assert await store.usage_request("req_unknown") is None
    cut, whole = usage(3, complete=False), usage(4)  # as the request path queues them: plain tuples, 1 or 0
    await store.record_usage([(*cut[:-1], 0), (*whole[:-1], 1)])
    assert await store.usage_request(cut.request_id) == cut
    assert await store.usage_request(whole.request_id) == whole
    assert (await store.usage_request(whole.request_id)).complete is True  # type: ignore[union-attr]
    await store.record_usage([])  # nothing to do, no error
    await store.close()


async def test_a_request_recorded_twice_counts_once(location: str) -> None:
    store = await open_store(location)
    a, b, c, d = (usage(n) for n in range(4))
    await store.record_usage([a, b])
    await store.record_usage([b, c])  # a batch written again after its commit went unacknowledged
    await store.record_usage([d, d._replace(cost_micro_usd=10**9), d])  # one id twice in a batch
    await store.record_usage([a, c])  # nothing new at all
    expected = expected_report([a, b, c, d], "2026-11-02", "2026-11-03", ["day"])
    assert expected[0]["requests"] == 4
    assert await store.usage_report("2026-11-02", "2026-11-03", ["day"], {}) == expected  # the daily totals
    ledger = await store.usage_report("2026-11-02T00:00:00.000Z", "2026-11-02T23:00:00.000Z", ["day"], {})
    assert ledger == expected  # the ledger rows
    assert await store.usage_request(d.request_id) == d  # the first of the batch's twins
    await store.close()


@pytest.mark.parametrize("size", [1, 3, 4, 5, 16, 21, 48, 64, 89, 150])
async def test_a_batch_of_any_size_records_each_request_once(location: str, size: int) -> None:
    """SQLite writes a batch in statements of several rows (48, 16, 4) and the rest one by one: every
    size, with twins inside a statement, across two of them and already recorded, counts each once."""
    store = await open_store(location)
    fresh = [usage(n, f"2026-11-02T{n % 24:02d}:00:00.000Z", cost_micro_usd=n) for n in range(1_000, 1_000 + size)]
    before = usage(7)
    await store.record_usage([before])
    twins = [fresh[0]._replace(cost_micro_usd=10**9), fresh[-1]._replace(cost_micro_usd=10**9)]
    batch = [*fresh[:2], twins[0], before, *fresh[2:], twins[1]]  # twins near the start and at the very end
    await store.record_usage(batch)
    expected = expected_report([before, *fresh], "2026-11-02", "2026-11-03", ["day"])
    assert expected[0]["requests"] == size + 1
    assert await store.usage_report("2026-11-02", "2026-11-03", ["day"], {}) == expected
    ledger = await store.usage_report("2026-11-02T00:00:00.000Z", "2026-11-03T00:00:00.000Z", ["day"], {})
    assert ledger == expected
    assert await store.usage_request(fresh[0].request_id) == fresh[0]
    assert await store.usage_request(fresh[-1].request_id) == fresh[-1]
    await store.record_usage(fresh)  # all recorded before: nothing changes
    assert await store.usage_report("2026-11-02", "2026-11-03", ["day"], {}) == expected
    await store.close()


async def test_the_sqlite_ledger_fits_older_sqlite_variable_limits(tmp_path: Path) -> None:
    """SQLite before 3.32 (still what some distributions' Python links) allows 999 bound values a
    statement: the ledger's largest statement stays under it."""
    store = SQLiteStore(tmp_path / "old.db")
    await store.open()
    assert store._ledger_db is not None
    store._ledger_db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    rows = [usage(n, f"2026-11-02T{n % 24:02d}:00:00.000Z") for n in range(200)]
    await store.record_usage(rows)
    report = await store.usage_report("2026-11-02", "2026-11-03", [], {})
    assert report[0]["requests"] == 200
    await store.close()


@pytest.mark.parametrize(
    "group_by",
    [
        [],
        ["day"],
        ["hour"],
        ["team"],
        ["key"],
        ["provider"],
        ["model"],
        ["day", "model"],
        ["model", "day"],
        ["team", "provider", "model"],
        ["hour", "key"],
        ["day", "team", "key", "provider", "model"],
    ],
)
async def test_reports_group_by_each_field_and_their_combinations(location: str, group_by: list[str]) -> None:
    store = await open_store(location)
    rows = mixed_rows()
    for first in range(0, len(rows), 7):
        await store.record_usage(rows[first : first + 7])
    # whole days (the daily totals, unless by hour), then times inside them (the ledger)
    for start, end in (("2026-11-01", "2026-11-04"), ("2026-11-01T05:00:00.000Z", "2026-11-03T17:30:00.000Z")):
        bounds = (start if "T" in start else start + "T00:00:00.000Z", end if "T" in end else end + "T00:00:00.000Z")
        assert await store.usage_report(start, end, group_by, {}) == expected_report(rows, *bounds, group_by)
    await store.close()


async def test_reports_filter_on_team_key_provider_and_model(location: str) -> None:
    store = await open_store(location)
    rows = mixed_rows()
    await store.record_usage(rows)
    cases: list[dict[str, str]] = [
        {"team_id": "team_2"},
        {"key_id": "key_bbbbbbbbbbbbbbbb"},
        {"provider": "openai"},
        {"model": "gpt-4o-mini"},
        {"team_id": "team_1", "provider": "anthropic"},
        {"team_id": "team_1", "key_id": "key_cccccccccccccccc"},  # another team's key: nothing
        {"model": "no-such-model"},
    ]
    for filters in cases:
        for start in ("2026-11-01", "2026-11-01T00:00:00.001Z"):
            for group_by in (["day", "model"], ["team"], []):
                report = await store.usage_report(start, "2026-11-04", group_by, filters)
                assert report == expected_report(rows, start, "2026-11-04", group_by, filters), (filters, group_by)
    await store.close()


async def test_unpriced_requests_give_no_cost_and_are_counted(location: str) -> None:
    store = await open_store(location)
    await store.record_usage(
        [
            usage(1, model="free-model", cost_micro_usd=None),
            usage(2, model="free-model", cost_micro_usd=None),
            usage(3, model="gpt-4o", cost_micro_usd=1_234),
            usage(4, model="gpt-4o", cost_micro_usd=None),
            usage(5, model="gpt-4o", cost_micro_usd=0),  # priced, and free: 0, not unpriced
        ]
    )
    for start in ("2026-11-02", "2026-11-02T00:00:00.000Z", "2026-11-02T10:00:00.000Z"):
        report = await store.usage_report(start, "2026-11-03", ["model"], {})
        by_model = {row["model"]: (row["costMicroUsd"], row["unpricedRequests"], row["requests"]) for row in report}
        assert by_model == {"free-model": (None, 2, 2), "gpt-4o": (1_234, 1, 3)}
    await store.close()


async def test_sums_of_many_rows_are_exact(location: str) -> None:
    store = await open_store(location)
    rows = [
        usage(n, f"2026-11-02T{n % 24:02d}:00:00.000Z", cost_micro_usd=987_654_321_001 + n, input_tokens=3_000_000_000)
        for n in range(2_400)
    ]
    await store.record_usage(rows)  # more rows than one SQLite statement takes
    total_cost = sum(row.cost_micro_usd or 0 for row in rows)
    for start in ("2026-11-02", "2026-11-02T00:00:00.000Z"):
        for group_by in ([], ["hour"]):
            if group_by == ["hour"] and "T" not in start:
                continue
            report = await store.usage_report(start, "2026-11-03", group_by, {})
            assert sum(row["costMicroUsd"] for row in report) == total_cost  # type: ignore[misc]
            assert sum(row["inputTokens"] for row in report) == 2_400 * 3_000_000_000  # type: ignore[misc]
            assert sum(row["requests"] for row in report) == 2_400  # type: ignore[misc]
    await store.close()


async def test_pruning_keeps_the_daily_totals(location: str) -> None:
    store = await open_store(location)
    rows = mixed_rows()
    await store.record_usage(rows)
    old = [row for row in rows if row.at < "2026-11-02"]
    assert await store.prune_usage("2026-11-02") == len(old)
    assert await store.prune_usage("2026-11-02T00:00:00.000Z") == 0
    assert await store.usage_request(old[0].request_id) is None
    kept = [row for row in rows if row.at >= "2026-11-02"]
    assert await store.usage_request(kept[0].request_id) == kept[0]
    # whole days: the daily totals, pruned days included; hours or parts of days: the ledger left
    assert await store.usage_report("2026-11-01", "2026-11-04", ["day", "model"], {}) == expected_report(
        rows, "2026-11-01", "2026-11-04", ["day", "model"]
    )
    assert await store.usage_report("2026-11-01", "2026-11-04", ["hour"], {}) == expected_report(
        kept, "2026-11-01", "2026-11-04", ["hour"]
    )
    await store.close()


async def test_sqlite_ledger_ranges_never_read_the_whole_ledger(tmp_path: Path) -> None:
    """Reports over hours, the failures count and the retention's pruning find their rows by the
    time the gateway's request ids start with (and the other ids by their time index), never by
    reading every ledger row: they stay fast on a large ledger with no time index of its own."""
    store = SQLiteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        start, end = "2026-11-01T10:00:00.000Z", "2026-11-01T11:00:00.000Z"
        report = report_query("qmark", start, end, ["hour", "model"], {"team_id": "team_1"})
        assert not report.daily
        for sql, params in (
            (report.sql, report.params),
            (FAILURES["qmark"], range_params(start, end)),
            (PRUNE["qmark"], prune_params(start)),
        ):
            async with store.db.execute(f"EXPLAIN QUERY PLAN {sql}", params) as cur:
                plan = [row[3] for row in await cur.fetchall()]
            assert "MULTI-INDEX OR" in plan, plan
            assert not [step for step in plan if step.startswith("SCAN usage_ledger")], plan
    finally:
        await store.close()


async def test_prune_old_usage_keeps_whole_days_of_the_retention(location: str) -> None:
    assert retention_start(90, datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == "2026-10-02T00:00:00.000Z"
    store = await open_store(location)
    today = datetime.now(UTC).date().isoformat()
    recent = usage(1, today + "T00:00:00.000Z")
    await store.record_usage([usage(2, "2020-01-01T12:00:00.000Z"), recent])
    assert await prune_old_usage(store, 1) == 1
    assert await store.usage_request(recent.request_id) == recent
    await store.close()


async def test_reports_refuse_unknown_groups_filters_and_bounds(location: str) -> None:
    store = await open_store(location)
    with pytest.raises(ValueError, match="'week'"):
        await store.usage_report("2026-11-01", "2026-11-02", ["day", "week"], {})
    with pytest.raises(ValueError, match="'digest'"):
        await store.usage_report("2026-11-01", "2026-11-02", [], {"digest": "x"})
    fullwidth = "\uff12\uff10\uff12\uff16-11-01"
    for bad in ("2026-11-01T00:00:00Z", "2026-11-01 00:00", fullwidth, "'; DROP TABLE tokens; --"):
        with pytest.raises(ValueError):
            await store.usage_report(bad, "2026-11-02", [], {})
        with pytest.raises(ValueError):
            await store.prune_usage(bad)
    await store.close()


async def test_the_ledger_writes_through_the_store(location: str) -> None:
    store = await open_store(location)
    ledger = Ledger(store, flush_seconds=0.01, batch=3)
    rows = mixed_rows()[:10]
    for row in rows:
        ledger.record(row)
    await ledger.stop()  # writes everything still queued
    assert ledger.written == 10 and not ledger.queue
    assert await store.usage_report("2026-11-01", "2026-11-04", [], {}) == expected_report(
        rows, "2026-11-01", "2026-11-04", []
    )
    await store.close()


async def test_limits_of_teams_and_keys(location: str) -> None:
    store = await open_store(location)
    try:
        first = Team("team_1", "One", "2026-11-01T00:00:00.000Z", "key_aaaaaaaaaaaaaaaa")
        await store.create("d1", first, "sk_11111")
        second = dataclasses.replace(first, name="Uno", key_id="key_bbbbbbbbbbbbbbbb", created_at="2026-11-02")
        await store.create("d2", second, "sk_22222")
        await store.create("d3", Team("team_2", "Two", "2026-11-03", "key_cccccccccccccccc"), "sk_33333")
        assert not await store.any_limits()
        marker = await store.change_marker()
        assert await store.set_limits("team", "team_1", Limits(60, None, 2, 5_000_000, "week"))
        assert await store.set_limits("key", "key_bbbbbbbbbbbbbbbb", Limits(None, 1000))
        assert not await store.set_limits("key", "key_dddddddddddddddd", Limits(1))
        assert await store.set_limits("team", "team_later", Limits(budget_micro_usd=7, budget_period="total"))
        assert await store.change_marker() != marker  # every cache drops what it holds
        assert await store.any_limits()
        team = await store.get("d2")
        assert team is not None and team.team_limits == Limits(60, None, 2, 5_000_000, "week")
        assert team.key_limits == Limits(None, 1000)
        assert (await store.get("d3")) == Team("team_2", "Two", "2026-11-03", "key_cccccccccccccccc")
        listed = await store.teams(10)
        assert [(t.team_id, t.name, t.key_count) for t in listed] == [("team_1", "One", 2), ("team_2", "Two", 1)]
        assert [t.team_id for t in await store.teams(10, "team_1")] == ["team_2"]
        later = await store.team("team_later")
        assert later is not None and later.key_count == 0 and later.limits == Limits(None, None, None, 7, "total")
        assert await store.team("team_nobody") is None
        assert await store.limits_of("key", "key_aaaaaaaaaaaaaaaa") is None
        assert await store.limits_of("team", "team_1") == Limits(60, None, 2, 5_000_000, "week")
        await store.set_limits("team", "team_1", Limits())
        assert await store.limits_of("team", "team_1") is None
        await store.record_usage(
            [
                usage(1, key_id="key_aaaaaaaaaaaaaaaa"),
                usage(2, at="2026-10-30T10:00:00.000Z", key_id="key_bbbbbbbbbbbbbbbb"),
            ]
        )
        assert await store.spent("team", "team_1", "2026-11-01") == 1_001
        assert await store.spent("team", "team_1", None) == 1_001 + 1_002
        assert await store.spent("key", "key_aaaaaaaaaaaaaaaa", None) == 1_001
    finally:
        await store.close()


async def test_usage_failures_count_failed_and_cut_short_requests_by_status(location: str) -> None:
    store = await open_store(location)
    try:
        at = "2026-11-02T10:%02d:00.000Z"
        await store.record_usage(
            [
                usage(1, at % 1),
                usage(2, at % 2, status=502),
                usage(3, at % 3, status=502, complete=False),
                usage(4, at % 4, status=429),
                usage(5, at % 5, complete=False),  # a 200 whose stream was cut short
                usage(6, at % 30, status=500),  # outside the range asked
            ]
        )
        assert await store.usage_failures("2026-11-02T10:00:00.000Z", "2026-11-02T10:30:00.000Z") == [
            (200, 1, 1),
            (429, 1, 0),
            (502, 2, 1),
        ]
        assert await store.usage_failures("2026-11-03", "2026-11-04") == []
    finally:
        await store.close()


async def test_a_key_rotates_by_its_id_without_its_secret(location: str) -> None:
    store = await open_store(location)
    directory = TeamDirectory(store)
    try:
        for n in range(3):  # other keys of the team, listed around it
            await directory.issue("team_rot", f"other {n}")
        key, team = await directory.issue("team_rot", "rotated")
        rotated = await directory.rotate_id(team.key_id)
        assert rotated is not None
        new_key, same = rotated
        assert same == team and new_key != key
        assert await directory.resolve(key) is None
        assert await directory.resolve(new_key) == team
        assert await directory.rotate_id("key_0000000000000000") is None
        assert await directory.rotate_id("not-a-key-id") is None
    finally:
        await store.close()
