"""The embedded store: one SQLite file through aiosqlite, in WAL mode.

Several workers may share the file: each opens its own connections, and every key write bumps
``gateway_state.version`` in its transaction: the cheap change counter their caches poll (writes of
``last_used_at`` leave it alone, so they do not empty every cache).

Two aiosqlite connections per store, because aiosqlite runs the statements of one connection in order
on one thread: a write waiting for another process's lock (up to the busy timeout) would hold up every
read queued behind it. Reads (``get``, ``find``, ``list``, ``change_marker``, ``ping``) go to a reading
connection, which in WAL mode never waits for a writer; writes (``last_used_at`` included) go to the
writing connection, one transaction at a time under ``_writing``. The usage ledger's batches have a
third, plain sqlite3 connection of their own: a whole batch is one call in a worker thread (aiosqlite
would hop threads once per statement), and it never queues behind a key write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from service.core.limits.model import Limits
from service.core.store import governance as sql
from service.core.store import limits as limits_sql
from service.core.store.base import (
    RECORD_COLUMNS,
    AuditEvent,
    Removed,
    StoreUnavailableError,
    Team,
    TeamSettings,
    TeamSummary,
    TokenRecord,
    audit_from_row,
    audit_params,
    list_column,
    list_value,
    record_from_row,
    unavailable_on,
    utc_timestamp,
)
from service.core.store.migrations import Dialect, ParamStyle, migrate
from service.core.store.usage import (
    ADD_DAILY_SQLITE,
    FAILURES,
    INSERT_LEDGER_SQLITE,
    LAST_ROWID_SQLITE,
    LEDGER_CHUNKS_SQLITE,
    PRUNE,
    SELECT_REQUEST,
    UPSERT_DAILY_SQLITE,
    FailureRows,
    ReportRows,
    bound,
    daily_totals,
    ledger_row,
    prune_params,
    range_params,
    report_query,
    report_rows,
)

if TYPE_CHECKING:
    from service.core.ledger import LedgerRow, LedgerValues

BUSY_TIMEOUT_SECONDS = 10.0
unavailable = unavailable_on(sqlite3.Error)
"""Every SQLite error a store method meets becomes ``StoreUnavailableError``."""

# sqlite3 binds int, float, str and bytes as they are, but sends None and bool through its adaptation
# protocol, which (with no adapter registered) looks up ``__adapt__`` and ``__conform__`` and formats
# an AttributeError for each: some 2,000 instructions per value, five or so per ledger row. A
# registered adapter is found first. Both are C functions and bind what sqlite3 bound before: None
# stays NULL (``{}.get(None)`` is None), a bool becomes the integer SQLite stores for it anyway.
_NOTHING: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NOTHING.get)
sqlite3.register_adapter(bool, int)


def _insert_ledger(db: sqlite3.Connection, rows: Sequence[LedgerValues]) -> int:
    """Insert the rows (skipping request ids already recorded) in ``LEDGER_CHUNKS_SQLITE``'s
    statements; how many were inserted."""
    inserted = at = 0
    for size, statement in LEDGER_CHUNKS_SQLITE.items():
        while len(rows) - at >= size:
            inserted += db.execute(statement, list(itertools.chain.from_iterable(rows[at : at + size]))).rowcount
            at += size
    if at < len(rows):
        inserted += db.executemany(INSERT_LEDGER_SQLITE, rows[at:]).rowcount
    return inserted


class _Migrating:
    """The writing connection, as the migration runner sees it."""

    dialect: Dialect = "sqlite"
    paramstyle: ParamStyle = "qmark"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, statement: str, params: tuple[object, ...] = ()) -> None:
        async with self.db.execute(statement, params):
            pass

    async def applied_versions(self) -> set[int]:
        async with self.db.execute("SELECT version FROM schema_migrations") as cur:
            return {int(row[0]) for row in await cur.fetchall()}


async def _use_wal(db: aiosqlite.Connection) -> None:
    """Switch the database to WAL. The switch needs the file to itself, and SQLite answers "database is
    locked" at once, without waiting its busy timeout, while another connection holds it (workers and
    processes opening a new database together): the switch is tried again until the busy timeout has
    passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.01)


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writing = asyncio.Lock()
        """Held for each write transaction: one at a time on the writing connection."""
        self._ledger_db: sqlite3.Connection | None = None
        """The ledger's own connection, used from a worker thread (``record_usage``): a batch is
        one hop to that thread, not one per statement as through aiosqlite."""
        self._ledger_lock = threading.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        """The writing connection."""
        if self._db is None:
            raise StoreUnavailableError("store is not open")
        return self._db

    @property
    def reader(self) -> aiosqlite.Connection:
        """The reading connection: statements that never wait for a writer (WAL)."""
        if self._reader is None:
            raise StoreUnavailableError("store is not open")
        return self._reader

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        except BaseException:
            await db.close()
            raise
        return db

    async def open(self) -> None:
        with unavailable_on(OSError, sqlite3.Error, context=f"cannot open SQLite database at {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await self._connect()
        try:
            with unavailable(f"cannot prepare SQLite database at {self.path}"):
                await _use_wal(self._db)
                await self._db.execute("PRAGMA synchronous=NORMAL")
                async with self._transaction() as db:  # one writer: concurrent starters wait, then find it done
                    await migrate(_Migrating(db))
                self._reader = await self._connect()
                self._ledger_db = await asyncio.to_thread(self._connect_ledger)
                await self._reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await self.close()
            raise

    def _connect_ledger(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _close_ledger(self) -> None:
        with self._ledger_lock:
            db, self._ledger_db = self._ledger_db, None
            if db is not None:
                db.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._close_ledger)
        reader, self._reader = self._reader, None
        db, self._db = self._db, None
        for connection in (reader, db):
            if connection is not None:
                await connection.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction on the writing connection (``BEGIN IMMEDIATE``: it waits for other
        processes' writers up to the busy timeout), alone on it: committed when the block ends,
        rolled back when it raises."""
        db = self.db
        async with self._writing:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself after some errors
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                raise

    async def _write(self, query: str, params: tuple[object, ...]) -> Any:
        """Run a key write returning at most one row; when it changed one, bump the change counter
        in the same transaction."""
        rows = await self._write_all(query, params)
        return rows[0] if rows else None

    async def _write_all(self, query: str, params: tuple[object, ...]) -> list[Any]:
        """Run a key write returning the rows it changed; bump the change counter if there are any."""
        with unavailable:
            async with self._transaction() as db:
                async with db.execute(query, params) as cur:
                    rows = list(await cur.fetchall())
                if rows:
                    await db.execute("UPDATE gateway_state SET version = version + 1 WHERE id = 1")
        return rows

    async def _read_one(self, query: str, params: tuple[object, ...] = ()) -> Any:
        with unavailable:
            async with self.reader.execute(query, params) as cur:
                return await cur.fetchone()

    async def _read_all(self, query: str, params: tuple[object, ...]) -> list[Any]:
        with unavailable:
            async with self.reader.execute(query, params) as cur:
                return list(await cur.fetchall())

    async def ping(self) -> None:
        await self._read_one("SELECT 1")

    async def create(self, digest: str, team: Team, key_prefix: str) -> None:
        await self._write(
            "INSERT INTO tokens (digest, team_id, name, created_at, key_prefix, key_id, allowed_models,"
            " allowed_providers, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING 1",
            (
                digest,
                team.team_id,
                team.name,
                team.created_at,
                key_prefix,
                team.key_id,
                list_column(team.allowed_models),
                list_column(team.allowed_providers),
                team.expires_at,
            ),
        )

    async def get(self, digest: str) -> Team | None:
        row = await self._read_one(limits_sql.GET_TEAM, (digest, digest, digest, utc_timestamp()))
        return limits_sql.team_from_row(row) if row else None

    async def set_limits(self, scope: str, ident: str, limits: Limits) -> bool:
        if scope == "team":
            return await self._write(limits_sql.SET_TEAM, (ident, utc_timestamp(), *limits.row())) is not None
        return await self._write(limits_sql.SET_KEY, (*limits.row(), ident)) is not None

    async def limits_of(self, scope: str, ident: str) -> Limits | None:
        row = await self._read_one(limits_sql.TEAM_LIMITS if scope == "team" else limits_sql.KEY_LIMITS, (ident,))
        return Limits.from_row(tuple(row)) if row else None

    async def teams(self, limit: int, after: str | None = None) -> list[TeamSummary]:
        if after is None:
            rows = await self._read_all(limits_sql.TEAMS_FIRST, (limit,))
        else:
            rows = await self._read_all(limits_sql.TEAMS_AFTER, (after, limit))
        return [summary for row in rows if (summary := limits_sql.summary_from_row(row)) is not None]

    async def team(self, team_id: str) -> TeamSummary | None:
        row = await self._read_one(limits_sql.TEAM, (team_id,) * 4)
        return limits_sql.summary_from_row(row) if row else None

    async def any_limits(self) -> bool:
        return await self._read_one(limits_sql.ANY_LIMITS) is not None

    async def spent(self, scope: str, ident: str, since: str | None) -> int:
        row = await self._read_one(limits_sql.SPENT[scope], (ident, since or limits_sql.EVER))
        return int(row[0]) if row else 0

    async def replace(
        self, old_digest: str, new_digest: str, new_prefix: str, grace_until: str | None = None
    ) -> Team | None:
        previous = old_digest if grace_until is not None else None
        row = await self._write(sql.REPLACE, (new_digest, new_prefix, previous, grace_until, old_digest))
        return await self.get(new_digest) if row else None

    async def delete(self, digest: str) -> Removed | None:
        row = await self._write(sql.DELETE, (digest, digest, utc_timestamp()))
        return sql.removed(row) if row else None

    async def find(self, key_id: str) -> TokenRecord | None:
        query = "SELECT " + RECORD_COLUMNS + " FROM tokens WHERE key_id = ?"  # noqa: S608 (constants only)
        row = await self._read_one(query, (key_id,))
        return record_from_row(row) if row else None

    async def delete_id(self, key_id: str) -> Removed | None:
        row = await self._write(sql.DELETE_ID, (key_id,))
        return sql.removed(row) if row else None

    async def delete_team(self, team_id: str) -> list[Removed]:
        return [sql.removed(row) for row in await self._write_all(sql.DELETE_TEAM, (team_id,))]

    async def update_key(self, key_id: str, columns: Mapping[str, object]) -> tuple[str, ...] | None:
        query, params = sql.update_key(columns)
        row = await self._write(query, (*params, key_id))
        if row is None:
            return None
        return (str(row[0]),) if row[1] is None else (str(row[0]), str(row[1]))

    async def team_settings(self, team_id: str) -> TeamSettings | None:
        row = await self._read_one(sql.TEAM_SETTINGS, (team_id,))
        return TeamSettings(row[0], row[1], list_value(row[2]), list_value(row[3])) if row else None

    async def update_team(self, team_id: str, columns: Mapping[str, object], updated_at: str) -> None:
        query, params = sql.update_team(columns)
        await self._write(query, (team_id, updated_at, *params))

    async def count_keys(self, team_id: str) -> int:
        row = await self._read_one(sql.COUNT_KEYS, (team_id,))
        return int(row[0]) if row else 0

    async def record_audit(self, events: Sequence[AuditEvent]) -> None:
        with unavailable:
            async with self._transaction() as db:
                await db.executemany(sql.INSERT_AUDIT, [audit_params(event) for event in events])

    async def audit(
        self, limit: int, after: tuple[str, str] | None, filters: Mapping[str, str], start: str | None, end: str | None
    ) -> list[AuditEvent]:
        query, params = sql.audit_query(limit, after, filters, start, end)
        return [audit_from_row(row) for row in await self._read_all(query, params)]

    async def note_expired(self, now: str) -> list[tuple[str, str, str]]:
        if await self._read_one(sql.ANY_EXPIRED, (now,)) is None:
            return []  # the common case: no write lock taken
        with unavailable:
            async with self._transaction() as db, db.execute(sql.NOTE_EXPIRED, (now,)) as cur:
                return [(str(row[0]), str(row[1]), str(row[2])) for row in await cur.fetchall()]

    async def list(
        self, limit: int, after: tuple[str, str] | None = None, team_id: str | None = None
    ) -> list[tuple[TokenRecord, str]]:
        conditions: list[str] = []
        params: list[object] = []
        if team_id is not None:
            conditions.append("team_id = ?")
            params.append(team_id)
        if after is not None:
            conditions.append("(created_at, digest) > (?, ?)")
            params.extend(after)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        query = "SELECT " + RECORD_COLUMNS + " FROM tokens" + where + " ORDER BY created_at, digest LIMIT ?"  # noqa: S608
        rows = await self._read_all(query, (*params, limit))
        return [(record_from_row(row), row[9]) for row in rows]

    async def touch(self, used: dict[str, str]) -> None:
        """A write like the others (under the write lock, in a transaction of its own), so that it
        never lands inside, or rolls back with, a key write; it leaves the change counter alone."""
        with unavailable:
            async with self._transaction() as db:
                await db.executemany(
                    "UPDATE tokens SET last_used_at = ? WHERE digest = ?", [(at, digest) for digest, at in used.items()]
                )

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        """SQLite has no notifications: the change marker alone keeps caches fresh."""

    async def change_marker(self) -> int:
        row = await self._read_one("SELECT version FROM gateway_state WHERE id = 1")
        return int(row[0]) if row else 0

    async def record_usage(self, rows: Sequence[LedgerValues]) -> None:
        """The rows, in one transaction on the ledger's own connection, in one hop to a thread: the
        new rows (a request id already recorded, or twice in the batch, is skipped), then the daily
        totals of exactly the rows inserted."""
        if not rows:
            return
        with unavailable:
            await asyncio.to_thread(self._record_usage, rows)

    def _record_usage(self, rows: Sequence[LedgerValues]) -> None:
        with self._ledger_lock:
            db = self._ledger_db
            if db is None:
                raise StoreUnavailableError("store is not open")
            db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = db.execute(LAST_ROWID_SQLITE).fetchone()
                inserted = _insert_ledger(db, rows)
                if inserted == len(rows):  # all new, as a rule: their totals are the batch's
                    db.executemany(UPSERT_DAILY_SQLITE, daily_totals(rows))
                elif inserted:  # some were recorded before: the totals of those inserted, by rowid
                    db.execute(ADD_DAILY_SQLITE, (last,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    async def prune_usage(self, before: str) -> int:
        with unavailable:
            async with self._transaction() as db, db.execute(PRUNE["qmark"], prune_params(bound(before))) as cur:
                return int(cur.rowcount)

    async def usage_request(self, request_id: str) -> LedgerRow | None:
        row = await self._read_one(SELECT_REQUEST["qmark"], (request_id,))
        return ledger_row(row) if row else None

    async def usage_report(
        self, start: str, end: str, group_by: Sequence[str], filters: Mapping[str, str]
    ) -> ReportRows:
        report = report_query("qmark", start, end, group_by, filters)
        return report_rows(report, await self._read_all(report.sql, report.params))

    async def usage_failures(self, start: str, end: str) -> FailureRows:
        rows = await self._read_all(FAILURES["qmark"], range_params(bound(start), bound(end)))
        return [(int(status), int(requests), int(incomplete)) for status, requests, incomplete in rows]
