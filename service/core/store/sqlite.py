"""The embedded store: one SQLite file through aiosqlite, in WAL mode.

Several workers may share the file: each opens its own connection, and every key write bumps
``gateway_state.version`` in its transaction: the cheap change counter their caches poll (writes of
``last_used_at`` leave it alone, so they do not empty every cache).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from service.core.store.base import StoreUnavailableError, Team, TokenRecord, utc_timestamp
from service.core.store.migrations import CREATE_TABLE, migrations

RECORD_COLUMNS = "key_id, key_prefix, team_id, name, created_at, last_used_at, digest"


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._writing = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailableError("store is not open")
        return self._db

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, timeout=10.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(f"cannot open SQLite database at {self.path}: {exc}") from exc
        self._db = db
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=10000")
            await self._migrate(db)
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailableError(f"cannot prepare SQLite database at {self.path}: {exc}") from exc

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")  # one writer: concurrent starters wait, then find it done
        try:
            await db.execute(CREATE_TABLE)
            async with db.execute("SELECT version FROM schema_migrations") as cur:
                applied = {row[0] for row in await cur.fetchall()}
            for migration in migrations("sqlite"):
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, utc_timestamp()),
                )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> None:
        try:
            await self.db.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def _write(self, query: str, params: tuple[object, ...]) -> Any:
        """Run a key write returning at most one row; when it changed one, bump the change counter
        in the same transaction."""
        rows = await self._write_all(query, params)
        return rows[0] if rows else None

    async def _write_all(self, query: str, params: tuple[object, ...]) -> list[Any]:
        """Run a key write returning the rows it changed; bump the change counter if there are any."""
        db = self.db
        async with self._writing:  # one transaction at a time on this connection
            return await self._write_locked(db, query, params)

    async def _write_locked(self, db: aiosqlite.Connection, query: str, params: tuple[object, ...]) -> list[Any]:
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                async with db.execute(query, params) as cur:
                    rows = list(await cur.fetchall())
                if rows:
                    await db.execute("UPDATE gateway_state SET version = version + 1 WHERE id = 1")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return rows

    async def create(self, digest: str, team: Team, key_prefix: str) -> None:
        await self._write(
            "INSERT INTO tokens (digest, team_id, name, created_at, key_prefix, key_id) VALUES (?, ?, ?, ?, ?, ?)"
            " RETURNING 1",
            (digest, team.team_id, team.name, team.created_at, key_prefix, team.key_id),
        )

    async def get(self, digest: str) -> Team | None:
        try:
            async with self.db.execute(
                "SELECT team_id, name, created_at, key_id FROM tokens WHERE digest = ?", (digest,)
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return Team(row[0], row[1], row[2], row[3]) if row else None

    async def replace(self, old_digest: str, new_digest: str, new_prefix: str) -> Team | None:
        row = await self._write(
            "UPDATE tokens SET digest = ?, key_prefix = ? WHERE digest = ? RETURNING team_id, name, created_at, key_id",
            (new_digest, new_prefix, old_digest),
        )
        return Team(row[0], row[1], row[2], row[3]) if row else None

    async def delete(self, digest: str) -> bool:
        return await self._write("DELETE FROM tokens WHERE digest = ? RETURNING 1", (digest,)) is not None

    async def find(self, key_id: str) -> TokenRecord | None:
        try:
            query = "SELECT " + RECORD_COLUMNS + " FROM tokens WHERE key_id = ?"  # noqa: S608 (constants only)
            async with self.db.execute(query, (key_id,)) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return TokenRecord(*row[:6]) if row else None

    async def delete_id(self, key_id: str) -> str | None:
        row = await self._write("DELETE FROM tokens WHERE key_id = ? RETURNING digest", (key_id,))
        return str(row[0]) if row else None

    async def delete_team(self, team_id: str) -> list[str]:
        rows = await self._write_all("DELETE FROM tokens WHERE team_id = ? RETURNING digest", (team_id,))
        return [str(row[0]) for row in rows]

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
        try:
            async with self.db.execute(query, (*params, limit)) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return [(TokenRecord(*row[:6]), row[6]) for row in rows]

    async def touch(self, used: dict[str, str]) -> None:
        try:
            await self.db.executemany(
                "UPDATE tokens SET last_used_at = ? WHERE digest = ?", [(at, digest) for digest, at in used.items()]
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        """SQLite has no notifications: the change marker alone keeps caches fresh."""

    async def change_marker(self) -> int:
        try:
            async with self.db.execute("SELECT version FROM gateway_state WHERE id = 1") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return int(row[0]) if row else 0
