"""The shared store for several processes and replicas: PostgreSQL through an asyncpg pool.

Every write bumps ``gateway_state.version`` and sends ``NOTIFY gateway_tokens, '<digest>'`` in its
transaction (an empty payload when several keys changed at once: anything may have changed). Each
process listens on a connection of its own and drops the named key from its cache at once; the
version is the change marker its cache also polls, should a notification be missed (for instance
while the listening connection reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import structlog

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
    FAILURES,
    INSERT_LEDGER_POSTGRES,
    LEDGER_COLUMNS,
    PRUNE,
    SELECT_REQUEST,
    FailureRows,
    ReportRows,
    bound,
    daily_totals,
    ledger_row,
    report_query,
    report_rows,
    unique,
    upsert_daily,
)

if TYPE_CHECKING:
    from service.core.ledger import LedgerRow, LedgerValues

log = structlog.get_logger("gateway.store")

CHANNEL = "gateway_tokens"
MIGRATION_LOCK = 0x6761_7465_7761_79  # "gateway": one advisory lock id for every replica
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
RECONNECT_SECONDS = 1.0
_GET_TEAM = limits_sql.numbered(limits_sql.GET_TEAM, "numeric")
_SET_TEAM = limits_sql.numbered(limits_sql.SET_TEAM, "numeric")
_SET_KEY = limits_sql.numbered(limits_sql.SET_KEY, "numeric")
_TEAM_LIMITS = limits_sql.numbered(limits_sql.TEAM_LIMITS, "numeric")
_KEY_LIMITS = limits_sql.numbered(limits_sql.KEY_LIMITS, "numeric")
_TEAMS_FIRST = limits_sql.numbered(limits_sql.TEAMS_FIRST, "numeric")
_TEAMS_AFTER = limits_sql.numbered(limits_sql.TEAMS_AFTER, "numeric")
_TEAM = limits_sql.numbered(limits_sql.TEAM, "numeric")
_SPENT = {scope: limits_sql.numbered(query, "numeric") for scope, query in limits_sql.SPENT.items()}

REPLACE = sql.numbered(sql.REPLACE, "numeric")
DELETE = sql.numbered(sql.DELETE, "numeric")
DELETE_ID = sql.numbered(sql.DELETE_ID, "numeric")
DELETE_TEAM = sql.numbered(sql.DELETE_TEAM, "numeric")
TEAM_SETTINGS = sql.numbered(sql.TEAM_SETTINGS, "numeric")
COUNT_KEYS = sql.numbered(sql.COUNT_KEYS, "numeric")
INSERT_AUDIT = sql.numbered(sql.INSERT_AUDIT, "numeric")
ANY_EXPIRED = sql.numbered(sql.ANY_EXPIRED, "numeric")
NOTE_EXPIRED = sql.numbered(sql.NOTE_EXPIRED, "numeric")


def secrets_in(dsn: str) -> list[str]:
    """What of a DSN must never reach a message: the DSN itself and its password (in the user
    part or the query, as written and decoded)."""
    found = [dsn]
    try:
        parts = urlsplit(dsn)
        passwords = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    except ValueError:
        return found
    for password in passwords:
        found.extend((password, unquote(password)))
    return [secret for secret in found if secret]


class _Migrating:
    """A connection in the migration transaction, as the migration runner sees it."""

    dialect: Dialect = "postgresql"
    paramstyle: ParamStyle = "numeric"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, statement: str, params: tuple[object, ...] = ()) -> None:
        await self.conn.execute(statement, *params)

    async def applied_versions(self) -> set[int]:
        return {int(row["version"]) for row in await self.conn.fetch("SELECT version FROM schema_migrations")}


class PostgresStore:
    def __init__(self, dsn: str, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._unavailable = unavailable_on(*DB_ERRORS, hide=secrets_in(dsn))
        """Every driver error a store method meets becomes ``StoreUnavailableError``, without the DSN."""

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailableError("store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            with self._unavailable("cannot open the PostgreSQL store"):
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.timeout,
                    command_timeout=self.timeout,
                )
                await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)  # one replica at a time
            for migration in await migrate(_Migrating(conn)):
                log.info("migration_applied", version=migration.version, name=migration.name)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.wait_for(pool.close(), self.timeout)

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        with self._unavailable:
            return await self.pool.fetchrow(query, *args, timeout=self.timeout)

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        with self._unavailable:
            return list(await self.pool.fetch(query, *args, timeout=self.timeout))

    async def _write(self, query: str, *args: Any, notify: str | None) -> Any:
        """Run a write returning at most one row; when it changed one, bump the change counter and
        notify (``notify=None``: with the row's first column, the digest), atomically."""
        rows = await self._write_all(query, *args, notify=notify)
        return rows[0] if rows else None

    async def _write_all(self, query: str, *args: Any, notify: str | None) -> list[Any]:
        """Run a write returning the rows it changed; if any, bump the change counter and notify
        once: ``notify``, else the one row's digest (first column), else ``''`` (anything changed:
        several rows, or a key whose previous secret is still accepted)."""
        with self._unavailable:
            async with self.pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                rows = list(await conn.fetch(query, *args))
                if rows:
                    if notify is None:
                        single = len(rows) == 1 and rows[0].get("previous_digest") is None
                        notify = str(rows[0][0]) if single else ""
                    await conn.execute("UPDATE gateway_state SET version = version + 1 WHERE id = 1")
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, notify)
                return rows

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    async def create(self, digest: str, team: Team, key_prefix: str) -> None:
        await self._write(
            "INSERT INTO tokens (digest, team_id, name, created_at, key_prefix, key_id, allowed_models,"
            " allowed_providers, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING 1",
            digest,
            team.team_id,
            team.name,
            team.created_at,
            key_prefix,
            team.key_id,
            list_column(team.allowed_models),
            list_column(team.allowed_providers),
            team.expires_at,
            notify=digest,
        )

    async def get(self, digest: str) -> Team | None:
        row = await self._fetchrow(_GET_TEAM, digest, digest, digest, utc_timestamp())
        return limits_sql.team_from_row(row) if row else None

    async def set_limits(self, scope: str, ident: str, limits: Limits) -> bool:
        if scope == "team":  # every key of the team may have changed: notify without a digest
            row = await self._write(_SET_TEAM, ident, utc_timestamp(), *limits.row(), notify="")
        else:
            row = await self._write(_SET_KEY, *limits.row(), ident, notify=None)
        return row is not None

    async def limits_of(self, scope: str, ident: str) -> Limits | None:
        row = await self._fetchrow(_TEAM_LIMITS if scope == "team" else _KEY_LIMITS, ident)
        return Limits.from_row(tuple(row)) if row else None

    async def teams(self, limit: int, after: str | None = None) -> list[TeamSummary]:
        rows = await (self._fetch(_TEAMS_FIRST, limit) if after is None else self._fetch(_TEAMS_AFTER, after, limit))
        return [summary for row in rows if (summary := limits_sql.summary_from_row(row)) is not None]

    async def team(self, team_id: str) -> TeamSummary | None:
        row = await self._fetchrow(_TEAM, *(team_id,) * 4)
        return limits_sql.summary_from_row(row) if row else None

    async def any_limits(self) -> bool:
        return await self._fetchrow(limits_sql.ANY_LIMITS) is not None

    async def spent(self, scope: str, ident: str, since: str | None) -> int:
        row = await self._fetchrow(_SPENT[scope], ident, since or limits_sql.EVER)
        return int(row[0]) if row else 0

    async def replace(
        self, old_digest: str, new_digest: str, new_prefix: str, grace_until: str | None = None
    ) -> Team | None:
        previous = old_digest if grace_until is not None else None
        row = await self._write(REPLACE, new_digest, new_prefix, previous, grace_until, old_digest, notify=old_digest)
        return await self.get(new_digest) if row else None

    async def delete(self, digest: str) -> Removed | None:
        row = await self._write(DELETE, digest, digest, utc_timestamp(), notify=None)
        return sql.removed(row) if row else None

    async def find(self, key_id: str) -> TokenRecord | None:
        query = "SELECT " + RECORD_COLUMNS + " FROM tokens WHERE key_id = $1"  # noqa: S608 (constants only)
        row = await self._fetchrow(query, key_id)
        return record_from_row(row) if row else None

    async def delete_id(self, key_id: str) -> Removed | None:
        row = await self._write(DELETE_ID, key_id, notify=None)
        return sql.removed(row) if row else None

    async def delete_team(self, team_id: str) -> list[Removed]:
        return [sql.removed(row) for row in await self._write_all(DELETE_TEAM, team_id, notify=None)]

    async def update_key(self, key_id: str, columns: Mapping[str, object]) -> tuple[str, ...] | None:
        query, params = sql.update_key(columns)
        row = await self._write(sql.numbered(query, "numeric"), *params, key_id, notify=None)
        if row is None:
            return None
        return (str(row[0]),) if row[1] is None else (str(row[0]), str(row[1]))

    async def team_settings(self, team_id: str) -> TeamSettings | None:
        row = await self._fetchrow(TEAM_SETTINGS, team_id)
        return TeamSettings(row[0], row[1], list_value(row[2]), list_value(row[3])) if row else None

    async def update_team(self, team_id: str, columns: Mapping[str, object], updated_at: str) -> None:
        query, params = sql.update_team(columns)
        await self._write(sql.numbered(query, "numeric"), team_id, updated_at, *params, notify="")

    async def count_keys(self, team_id: str) -> int:
        row = await self._fetchrow(COUNT_KEYS, team_id)
        return int(row[0]) if row else 0

    async def record_audit(self, events: Sequence[AuditEvent]) -> None:
        with self._unavailable:
            await self.pool.executemany(INSERT_AUDIT, [audit_params(event) for event in events])

    async def audit(
        self, limit: int, after: tuple[str, str] | None, filters: Mapping[str, str], start: str | None, end: str | None
    ) -> list[AuditEvent]:
        query, params = sql.audit_query(limit, after, filters, start, end)
        return [audit_from_row(row) for row in await self._fetch(sql.numbered(query, "numeric"), *params)]

    async def note_expired(self, now: str) -> list[tuple[str, str, str]]:
        if await self._fetchrow(ANY_EXPIRED, now) is None:
            return []
        rows = await self._fetch(NOTE_EXPIRED, now)
        return [(str(row[0]), str(row[1]), str(row[2])) for row in rows]

    async def list(
        self, limit: int, after: tuple[str, str] | None = None, team_id: str | None = None
    ) -> list[tuple[TokenRecord, str]]:
        conditions: list[str] = []
        args: list[object] = []
        if team_id is not None:
            args.append(team_id)
            conditions.append(f"team_id = ${len(args)}")
        if after is not None:
            args.extend(after)
            conditions.append(f"(created_at, digest) > (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        order = f" ORDER BY created_at, digest LIMIT ${len(args)}"
        query = "SELECT " + RECORD_COLUMNS + " FROM tokens" + where + order  # noqa: S608 (constants and $n only)
        rows = await self._fetch(query, *args)
        return [(record_from_row(row), row[9]) for row in rows]

    async def touch(self, used: dict[str, str]) -> None:
        with self._unavailable:
            await self.pool.executemany(
                "UPDATE tokens SET last_used_at = $1 WHERE digest = $2", [(at, digest) for digest, at in used.items()]
            )

    async def record_usage(self, rows: Sequence[LedgerValues]) -> None:
        """One transaction: the new rows in one statement (one array per column; a request id
        already recorded is skipped), then the daily totals of exactly the rows it inserted, in a
        fixed order, so replicas adding to the same totals at once never deadlock."""
        batch = unique(rows)
        if not batch:
            return
        columns = [list(values) for values in zip(*batch, strict=True)]
        assert len(columns) == len(LEDGER_COLUMNS)
        columns[-1] = [bool(complete) for complete in columns[-1]]  # 1 or 0 from the request path
        with self._unavailable:
            async with self.pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                inserted = {str(row[0]) for row in await conn.fetch(INSERT_LEDGER_POSTGRES, *columns)}
                totals = daily_totals([row for row in batch if row[0] in inserted])
                if totals:
                    await conn.executemany(upsert_daily("numeric"), totals)

    async def prune_usage(self, before: str) -> int:
        with self._unavailable:
            status = await self.pool.execute(PRUNE["numeric"], bound(before), timeout=self.timeout)
        return int(str(status).rsplit(" ", 1)[-1])  # "DELETE 42"

    async def usage_request(self, request_id: str) -> LedgerRow | None:
        row = await self._fetchrow(SELECT_REQUEST["numeric"], request_id)
        return ledger_row(row) if row else None

    async def usage_report(
        self, start: str, end: str, group_by: Sequence[str], filters: Mapping[str, str]
    ) -> ReportRows:
        report = report_query("numeric", start, end, group_by, filters)
        return report_rows(report, await self._fetch(report.sql, *report.params))

    async def usage_failures(self, start: str, end: str) -> FailureRows:
        rows = await self._fetch(FAILURES["numeric"], bound(start), bound(end))
        return [(int(status), int(requests), int(incomplete)) for status, requests, incomplete in rows]

    async def change_marker(self) -> int:
        row = await self._fetchrow("SELECT version FROM gateway_state WHERE id = 1")
        return int(row[0]) if row else 0

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        self._listener = asyncio.create_task(self._listen(on_change), name="store-listen")

    async def _listen(self, on_change: Callable[[str | None], None]) -> None:
        """Keep one LISTEN connection; after any gap, report that anything may have changed."""

        def notified(conn: Any, pid: int, channel: str, payload: object) -> None:
            on_change(str(payload) or None)

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, notified)
                on_change(None)  # whatever happened while nobody listened
                await lost.wait()
            except DB_ERRORS:
                pass
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(*DB_ERRORS):
                        await asyncio.wait_for(conn.close(), self.timeout)
            await asyncio.sleep(RECONNECT_SECONDS)
