"""Numbered SQL migrations shared by every store: ``migrations/NNNN_name.sql``, applied in order once.

A migration the two databases cannot share (a function one of them lacks) comes as one file per
dialect, ``NNNN_name.sqlite.sql`` and ``NNNN_name.postgresql.sql``, under one number and name.

Each store records what it applied in ``schema_migrations`` and applies the rest at start-up with
``migrate``, the one runner both share, over a small adapter of its own (``MigrationConnection``),
while holding its database's lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock in a
transaction), so many processes starting at once migrate once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from service.core.store.base import utc_timestamp

Dialect = Literal["sqlite", "postgresql"]
ParamStyle = Literal["qmark", "numeric"]
"""How a driver's statements name their parameters: ``?`` (sqlite3) or ``$1`` (asyncpg)."""
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")
DIRECTORY = Path(__file__).with_name("migrations")
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)(?:\.(sqlite|postgresql))?\.sql")
CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
RECORD = {
    "qmark": "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
    "numeric": "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations(dialect: Dialect, directory: Path = DIRECTORY) -> list[Migration]:
    """The migrations for one database, in order: the shared files and that dialect's own."""
    found: dict[int, Migration] = {}
    dialects_of: dict[int, set[str]] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if match is None:
            raise RuntimeError(f"migration file name must look like 0001_name.sql or 0001_name.sqlite.sql: {path.name}")
        version, name, only = int(match.group(1)), match.group(2), match.group(3)
        dialects_of.setdefault(version, set()).add(only or "shared")
        if only is not None and only != dialect:
            continue
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        statements = tuple(part.strip() for part in text.split(";") if part.strip())
        if version in found:
            raise RuntimeError(f"two migrations numbered {version:04d} for {dialect}")
        found[version] = Migration(version, name, statements)
    for version, kinds in dialects_of.items():
        if kinds != {"shared"} and kinds != set(DIALECTS):
            raise RuntimeError(f"migration {version:04d} needs one file per dialect ({', '.join(DIALECTS)})")
    versions = sorted(found)
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, 3, … without gaps; found {versions}")
    return [found[v] for v in versions]


def latest_version() -> int:
    """The schema version a store has once every migration is applied."""
    return len(migrations("sqlite"))


class MigrationConnection(Protocol):
    """What ``migrate`` needs of a database: one connection, inside the transaction (and under the
    lock) its store opened for migrating."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def paramstyle(self) -> ParamStyle: ...

    async def execute(self, statement: str, params: tuple[object, ...] = ()) -> None: ...

    async def applied_versions(self) -> set[int]:
        """The versions ``schema_migrations`` holds."""


async def migrate(connection: MigrationConnection, directory: Path = DIRECTORY) -> list[Migration]:
    """Apply the migrations ``connection``'s database lacks, in order, recording each; the ones
    applied. The caller holds the transaction and the lock: the runner only talks SQL."""
    await connection.execute(CREATE_TABLE)
    applied = await connection.applied_versions()
    done: list[Migration] = []
    for migration in migrations(connection.dialect, directory):
        if migration.version in applied:
            continue
        for statement in migration.statements:
            await connection.execute(statement)
        await connection.execute(RECORD[connection.paramstyle], (migration.version, migration.name, utc_timestamp()))
        done.append(migration)
    return done
