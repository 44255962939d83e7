"""The ``gateway`` command: serve, manage keys on the configured database, check the set-up.

    gateway serve [--host H] [--port P] [--workers N]
    gateway tokens create --team T [--name N] [--expires 30d|12h|2026-12-31T18:00:00Z] [--allow-models gpt-4o*,…]
                          [--allow-providers openai,…]
                  | list [--limit N] [--team T] | show KEY | rotate KEY [--grace 1h] | revoke KEY
    gateway keys show KEYID | revoke KEYID | set-limits KEYID [limit options]
                 | update KEYID [--expires …|never] [--allow-models …|none] [--allow-providers …|none]
    gateway teams list [--limit N] | show TEAMID | set-limits TEAMID [limit options]
                  | update TEAMID [--allow-models …|none] [--allow-providers …|none] | revoke-keys TEAMID
        limit options: --requests-per-minute N, --tokens-per-minute N, --max-concurrent N,
                       --budget-usd USD, --budget-period day|week|month|total (each 'none' to clear)
    gateway audit [--team T] [--key KEYID] [--action key.revoked] [--since 7d] [--until …] [--limit N]
    gateway usage [--team T] [--key KEYID] [--provider P] [--model M] [--since 7d|24h|2026-11-01]
                  [--until …] [--by day,model] [--json|--csv]
    gateway check
    gateway mock-upstream [--port P] [--token T]

Key commands work on the database directly (no HTTP call, no admin key), so the first key needs
nothing running. Team ids and names are checked as the token API checks them. Tables for people
(non-printable characters escaped), ``--json`` for scripts. Exit codes: 0 done, 1 no such key,
2 usage, 3 configuration error, 4 store or Cloudflare AI Gateway unreachable or refusing, 5 the
address to listen on is in use (``serve``).
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog

from config import Settings, SettingsError
from providers.upstream import enabled_upstreams
from providers.upstream import mode as upstream_mode
from service import fields
from service.core import audit
from service.core.errors import BadRequest, Conflict, NotFound
from service.core.limits.limiter import Limiter, limiter_for
from service.core.limits.model import NO_LIMITS, Limits
from service.core.limits.outcome import Subject
from service.core.store import StoreUnavailableError, TokenRecord, TokenStore, store_for
from service.core.store.base import TeamSummary
from service.core.store.migrations import latest_version
from service.core.teams import TeamDirectory
from service.governance import audit_filters, audit_page
from service.teams_api import LIMIT_FIELDS, apply_patch, limits_field, team_settings_json
from service.tokens import (
    MAX_NAME,
    MAX_PAGE,
    MAX_TEAM_ID,
    check_text,
    issue,
    issued_json,
    new_key_fields,
    record_json,
    whole_number,
)
from service.tokens import team_json as key_json
from service.usage import (
    FILTERS,
    GROUP_FIELDS,
    SUM_FIELDS,
    build_report,
    parse_group_by,
    parse_time,
    report_csv,
    report_json,
    time_range,
    timestamp,
    usd,
)

OK, NOT_FOUND, USAGE, CONFIGURATION, UNAVAILABLE = 0, 1, 2, 3, 4


class CommandFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def printable(value: object) -> str:
    """A value for a terminal: ``None`` as nothing, non-printable characters (terminal escapes,
    newlines) as their Python escapes, so stored text cannot drive the terminal."""
    if value is None:
        return ""
    text = ", ".join(str(item) for item in value) if isinstance(value, list) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[printable(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(args: argparse.Namespace, rows: Sequence[dict[str, Any]], columns: Sequence[str], *, single: bool) -> None:
    if args.json:
        print(orjson.dumps(rows[0] if single else list(rows), option=orjson.OPT_INDENT_2).decode())
    elif single:
        width = max(len(c) for c in columns)
        print("\n".join(f"{c.ljust(width)}  {printable(rows[0].get(c))}" for c in columns))
    else:
        print(table(rows, columns))


async def with_directory(settings: Settings, work: Callable[[TeamDirectory], Awaitable[int]]) -> int:
    store = store_for(settings)
    await store.open()
    try:
        return await work(TeamDirectory(store))
    finally:
        await store.close()


RECORD_COLUMNS = ["keyId", "keyPrefix", "teamId", "name", "createdAt", "lastUsedAt", "expiresAt", "expired"]
KEY_COLUMNS = ["keyId", "teamId", "name", "createdAt", "allowedModels", "allowedProviders", "expiresAt", "expired"]
GOVERNANCE_OPTIONS = {"allowedModels": "--allow-models", "allowedProviders": "--allow-providers"}


def governance_options(args: argparse.Namespace, *, creating: bool) -> dict[str, object]:
    """``--expires``, ``--allow-models`` and ``--allow-providers`` as the API's fields: a duration
    (``30d``) is ``expiresIn``, a time ``expiresAt``, ``never`` no expiry; lists are comma-separated,
    ``none`` (or empty) for no list."""
    payload: dict[str, object] = {}
    expires = getattr(args, "expires", None)
    if expires is not None:
        raw = expires.strip()
        if raw == "never" and not creating:
            payload["expiresAt"] = None
        elif raw[-1:] in ("s", "m", "h", "d") and raw[:-1].isdigit():
            payload["expiresIn"] = raw
        else:
            payload["expiresAt"] = raw
    for name, option in GOVERNANCE_OPTIONS.items():
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None:
            items = [item.strip() for item in value.split(",") if item.strip()]
            payload[name] = None if items in ([], ["none"]) else items
    return payload


def option_message(message: str) -> str:
    """An API message in the CLI's terms: ``'expiresIn'`` → ``--expires``."""
    for field_name, option in (*GOVERNANCE_OPTIONS.items(), ("expiresIn", "--expires"), ("expiresAt", "--expires")):
        message = message.replace(f"'{field_name}'", option)
    return message


def known_providers(settings: Settings) -> tuple[str, ...]:
    return tuple(enabled_upstreams(settings)[1])


def checked(value: str, option: str, limit: int) -> str:
    """A team id or name, checked exactly as the token API checks it."""
    try:
        return check_text(value, option, limit)
    except BadRequest as exc:
        raise CommandFailed(exc.message, USAGE) from None


def tokens_command(args: argparse.Namespace, settings: Settings) -> int:
    team_columns = ["apiKey", *KEY_COLUMNS]

    async def create(directory: TeamDirectory) -> int:
        team_id = checked(args.team, "--team", MAX_TEAM_ID)
        name = team_id if args.name is None else checked(args.name, "--name", MAX_NAME)
        payload = {"teamId": team_id, "name": name, **governance_options(args, creating=True)}
        try:
            team_id, name, change = new_key_fields(payload, known_providers(settings))
        except BadRequest as exc:
            raise CommandFailed(option_message(exc.message), USAGE) from None
        key, team = await issue(directory, team_id, name, change, audit.CLI)
        emit(args, [issued_json(key, team)], team_columns, single=True)
        return OK

    async def listing(directory: TeamDirectory) -> int:
        team_id = None if args.team is None else checked(args.team, "--team", MAX_TEAM_ID)
        rows: list[tuple[TokenRecord, str]] = await directory.store.list(args.limit, None, team_id)
        emit(args, [record_json(record) for record, _ in rows], RECORD_COLUMNS, single=False)
        return OK

    async def show(directory: TeamDirectory) -> int:
        team = await directory.resolve(args.key)
        if team is None:
            raise CommandFailed("no such key", NOT_FOUND)
        emit(args, [key_json(team)], KEY_COLUMNS, single=True)
        return OK

    async def rotate(directory: TeamDirectory) -> int:
        grace = None
        if args.grace is not None:
            raw = args.grace.strip()
            try:
                grace = int(raw) if raw.isascii() and raw.isdigit() else fields.duration_seconds(raw, "--grace")
            except BadRequest as exc:
                raise CommandFailed(exc.message, USAGE) from None
            if grace > fields.MAX_GRACE_SECONDS:
                raise CommandFailed("--grace must be at most 7 days (604800 seconds)", USAGE)
        rotated = await directory.rotate(args.key, audit.CLI, grace)
        if rotated is None:
            raise CommandFailed("no such key", NOT_FOUND)
        key, team = rotated
        emit(args, [issued_json(key, team)], team_columns, single=True)
        return OK

    async def revoke(directory: TeamDirectory) -> int:
        if not await directory.revoke(args.key):
            raise CommandFailed("no such key", NOT_FOUND)
        emit(args, [{"revoked": True, "key": args.key[:8] + "…"}], ["revoked", "key"], single=True)
        return OK

    work = {"create": create, "list": listing, "show": show, "rotate": rotate, "revoke": revoke}[args.action]
    return asyncio.run(with_directory(settings, work))


def keys_command(args: argparse.Namespace, settings: Settings) -> int:
    """Keys by their id (``key_…``), for when the key itself is not at hand."""

    async def show(directory: TeamDirectory) -> int:
        record = await directory.find(args.key_id)
        if record is None:
            raise CommandFailed("no such key", NOT_FOUND)
        limits = await directory.store.limits_of("key", args.key_id)
        row = {
            **record_json(record),
            "limits": (limits or NO_LIMITS).json(),
            "state": await subject_state(settings, directory.store, "key", args.key_id, limits),
        }
        emit_limited(args, row, RECORD_COLUMNS)
        return OK

    async def revoke(directory: TeamDirectory) -> int:
        if not await directory.revoke_id(args.key_id):
            raise CommandFailed("no such key", NOT_FOUND)
        emit(args, [{"revoked": True, "keyId": args.key_id}], ["revoked", "keyId"], single=True)
        return OK

    async def set_limits(directory: TeamDirectory) -> int:
        if await directory.find(args.key_id) is None:
            raise CommandFailed("no such key", NOT_FOUND)
        await apply_limits(args, settings, directory, "key", args.key_id)
        return await show(directory)

    async def update(directory: TeamDirectory) -> int:
        before = await directory.find(args.key_id)
        if before is None:
            raise CommandFailed("no such key", NOT_FOUND)
        try:
            change = fields.apply(
                governance_options(args, creating=False),
                fields.KEY_FIELDS,
                fields.Change(known_providers=known_providers(settings)),
            )
        except BadRequest as exc:
            raise CommandFailed(option_message(exc.message), USAGE) from None
        try:
            limiter = cli_limiter(settings, directory.store)
            await apply_patch(directory, limiter, "key", args.key_id, change, [], audit.CLI)
        except NotFound:
            raise CommandFailed("no such key", NOT_FOUND) from None
        record = await directory.find(args.key_id)
        if record is None:
            raise CommandFailed("no such key", NOT_FOUND)
        emit(args, [record_json(record)], [*RECORD_COLUMNS[:6], *KEY_COLUMNS[4:]], single=True)
        return OK

    work = {"show": show, "revoke": revoke, "set-limits": set_limits, "update": update}[args.action]
    return asyncio.run(with_directory(settings, work))


LIMIT_OPTIONS = {
    "requestsPerMinute": "requests_per_minute",
    "tokensPerMinute": "tokens_per_minute",
    "maxConcurrent": "max_concurrent",
    "budgetUsd": "budget_usd",
    "budgetPeriod": "budget_period",
}
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
"""A JSON number, as the API would receive it (its range is then checked as the API checks it)."""


def limit_value(field: str, raw: str) -> object:
    """A limit option's value as the API would receive it: ``none`` clears; numbers stay numbers."""
    if raw.lower() == "none":
        return None
    if field == "budgetPeriod":
        return raw
    if len(raw) > 40 or _NUMBER.fullmatch(raw) is None:
        option = "--" + LIMIT_OPTIONS[field].replace("_", "-")
        raise CommandFailed(f"{option} must be a number or 'none', got {raw[:40]!r}", USAGE)
    return orjson.loads(raw)


async def apply_limits(
    args: argparse.Namespace, settings: Settings, directory: TeamDirectory, kind: str, ident: str
) -> None:
    """Set the limits given as options, checked and applied (and audited) exactly as ``PATCH`` does."""
    given = {f: limit_value(f, getattr(args, o)) for f, o in LIMIT_OPTIONS.items() if getattr(args, o) is not None}
    if not given:
        options = ", ".join("--" + option.replace("_", "-") for option in LIMIT_OPTIONS.values())
        raise CommandFailed(f"set-limits needs at least one of {options}", USAGE)
    try:
        apply = limits_field(given)
        limiter = cli_limiter(settings, directory.store)
        await apply_patch(directory, limiter, kind, ident, fields.Change(), [apply], audit.CLI)
    except BadRequest as exc:
        raise CommandFailed(exc.message, USAGE) from None
    except Conflict as exc:
        raise CommandFailed(exc.message, CONFIGURATION) from None
    except NotFound:
        raise CommandFailed("no such key", NOT_FOUND) from None


def cli_limiter(settings: Settings, store: TokenStore) -> Limiter:
    async def seed(subject: Subject, period: str) -> int:
        return await store.spent(subject.kind, subject.ident, None if period == "total" else period)

    return limiter_for(settings, seed)


async def subject_state(
    settings: Settings, store: TokenStore, kind: str, ident: str, limits: Limits | None
) -> dict[str, object] | None:
    """The figures of a team or key, where a command can read them: in Redis (``REDIS_URL``).
    Without it they live in the running gateway's memory, and ``GET /teams/{teamId}`` shows them."""
    if settings.redis_url is None:
        return None
    limiter = cli_limiter(settings, store)
    await limiter.start()
    try:
        state = await limiter.state(Subject(kind, ident, limits or NO_LIMITS))
    except Exception:  # the store of limits is unreachable: the rest is still worth showing
        return None
    finally:
        await limiter.stop()
    return state.json(limits, datetime.now(UTC).timestamp())


STATE_COLUMNS = [
    "spentUsd",
    "reservedUsd",
    "remainingUsd",
    "periodStart",
    "resetsAt",
    "requestsThisMinute",
    "tokensThisMinute",
    "inFlight",
]


def emit_limited(args: argparse.Namespace, row: dict[str, Any], columns: Sequence[str]) -> None:
    """A team or key with its limits and state: nested for ``--json``, flat for people."""
    if args.json:
        emit(args, [row], [], single=True)
        return
    state = row.get("state")
    flat = {**row, **row["limits"], **(state or {})}
    emit(args, [flat], [*columns, *LIMIT_FIELDS, *(STATE_COLUMNS if state else [])], single=True)


TEAM_COLUMNS = ["teamId", "name", "keyCount"]
TEAM_SETTINGS_COLUMNS = ["allowedModels", "allowedProviders", "updatedAt"]


def teams_command(args: argparse.Namespace, settings: Settings) -> int:
    team_id = checked(args.team_id, "TEAMID", MAX_TEAM_ID) if "team_id" in args else ""

    async def team_row(store: TokenStore, team: TeamSummary) -> dict[str, Any]:
        return {
            "teamId": team.team_id,
            "name": team.name,
            "keyCount": team.key_count,
            "limits": (team.limits or NO_LIMITS).json(),
            "state": await subject_state(settings, store, "team", team.team_id, team.limits),
            **team_settings_json(team),
        }

    async def listing(directory: TeamDirectory) -> int:
        found = await directory.store.teams(args.limit)
        rows: list[dict[str, Any]] = []
        for t in found:
            limits = (t.limits or NO_LIMITS).json()
            team = {"teamId": t.team_id, "name": t.name, "keyCount": t.key_count}
            rows.append({**team, "limits": limits, **team_settings_json(t)} if args.json else {**team, **limits})
        emit(args, rows, [*TEAM_COLUMNS, *LIMIT_FIELDS], single=False)
        return OK

    async def show(directory: TeamDirectory) -> int:
        team = await directory.store.team(team_id)
        if team is None:
            raise CommandFailed("no such team", NOT_FOUND)
        emit_limited(args, await team_row(directory.store, team), [*TEAM_COLUMNS, *TEAM_SETTINGS_COLUMNS])
        return OK

    async def set_limits(directory: TeamDirectory) -> int:
        await apply_limits(args, settings, directory, "team", team_id)
        return await show(directory)

    async def revoke_keys(directory: TeamDirectory) -> int:
        revoked = await directory.revoke_team(team_id)
        emit(args, [{"teamId": team_id, "revoked": revoked}], ["teamId", "revoked"], single=True)
        return OK

    async def update(directory: TeamDirectory) -> int:
        try:
            change = fields.apply(
                governance_options(args, creating=False),
                fields.TEAM_FIELDS,
                fields.Change(known_providers=known_providers(settings)),
            )
        except BadRequest as exc:
            raise CommandFailed(option_message(exc.message), USAGE) from None
        limiter = cli_limiter(settings, directory.store)
        await apply_patch(directory, limiter, "team", team_id, change, [], audit.CLI)
        return await show(directory)

    work = {
        "list": listing,
        "show": show,
        "set-limits": set_limits,
        "update": update,
        "revoke-keys": revoke_keys,
    }[args.action]
    return asyncio.run(with_directory(settings, work))


AUDIT_COLUMNS = ["at", "action", "actor", "teamId", "keyId", "changes", "clientAddress", "requestId"]
AUDIT_OPTIONS = {"teamId": "--team", "keyId": "--key", "action": "--action"}


def audit_command(args: argparse.Namespace, settings: Settings) -> int:
    """The audit trail, newest first, on the database directly (as ``GET /audit`` answers it)."""
    now = datetime.now(UTC)
    try:
        start = None if args.since is None else usage_time(args.since, "--since", now)
        end = None if args.until is None else usage_time(args.until, "--until", now)
        filters = audit_filters({"teamId": args.team, "keyId": args.key, "action": args.action})
    except BadRequest as exc:
        message = exc.message
        for name, option in AUDIT_OPTIONS.items():
            message = message.replace(f"'{name}'", option)
        raise CommandFailed(message, USAGE) from None
    start_text = None if start is None else timestamp(start)
    end_text = None if end is None else timestamp(end)

    async def listing(directory: TeamDirectory) -> int:
        page = await audit_page(directory.store, args.limit, None, filters, start_text, end_text)
        rows = [{**event, "changes": orjson.dumps(event["changes"]).decode()} for event in page["events"]]
        if args.json:
            print(orjson.dumps(page["events"], option=orjson.OPT_INDENT_2).decode())
        else:
            print(table(rows, AUDIT_COLUMNS))
        return OK

    return asyncio.run(with_directory(settings, listing))


_RELATIVE = re.compile(r"([0-9]{1,5})([dh])")
USAGE_OPTIONS = {"teamId": "--team", "keyId": "--key", "provider": "--provider", "model": "--model"}


def usage_time(raw: str, option: str, now: datetime) -> datetime:
    """``7d`` or ``24h`` before ``now``, or a date or UTC time as ``GET /usage`` takes them."""
    relative = _RELATIVE.fullmatch(raw)
    if relative is None:
        try:
            return parse_time(raw, option)
        except BadRequest:
            raise BadRequest(f"{option} must be like 7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z") from None
    amount = int(relative.group(1))
    return now - (timedelta(days=amount) if relative.group(2) == "d" else timedelta(hours=amount))


def usage_table(report: dict[str, Any]) -> str:
    """A report for people: costs as $0.001234 or "unpriced" ("-" with no requests), and a total line."""
    fields = [GROUP_FIELDS[name] for name in report["groupBy"]]
    columns = [*fields, *SUM_FIELDS, "cost", "unpricedRequests"]
    shown = []
    for row in [*report["rows"], {**report["totals"], **dict.fromkeys(fields[:1], "total")}]:
        cost = row["costMicroUsd"]
        if cost is not None:
            shown.append({**row, "cost": f"${usd(cost)}"})
        else:
            shown.append({**row, "cost": "unpriced" if row["requests"] else "-"})
    return table(shown, columns)


def usage_command(args: argparse.Namespace, settings: Settings) -> int:
    """Usage and cost from the ledger, on the database directly (as ``GET /usage`` reports it)."""
    now = datetime.now(UTC)
    try:
        start = None if args.since is None else usage_time(args.since, "--since", now)
        end = None if args.until is None else usage_time(args.until, "--until", now)
        start_text, end_text = time_range(start, end, now, names=("--since", "--until"))
        group_by = parse_group_by(args.by, "--by")
    except BadRequest as exc:
        raise CommandFailed(exc.message, USAGE) from None
    options = {"teamId": args.team, "keyId": args.key, "provider": args.provider, "model": args.model}
    filters = {
        FILTERS[name][0]: checked(value, USAGE_OPTIONS[name], FILTERS[name][1])
        for name, value in options.items()
        if value is not None
    }

    async def report(directory: TeamDirectory) -> int:
        found = await build_report(directory.store, start_text, end_text, group_by, filters)
        if args.csv:
            sys.stdout.write(report_csv(found))
        elif args.json:
            print(report_json(found, orjson.OPT_INDENT_2).decode())
        else:
            print(f"usage from {start_text} to {end_text} (excluded)")
            print(usage_table(found))
        return OK

    return asyncio.run(with_directory(settings, report))


async def reach_gateway(settings: Settings) -> tuple[bool, str]:
    """Call Cloudflare AI Gateway as the relay would; ``(ok, verdict)``."""
    if not settings.ai_gateway_url:
        return True, "not set: providers go direct where their key is set"
    headers = {"cf-aig-authorization": f"Bearer {settings.ai_gateway_token}"} if settings.ai_gateway_token else {}
    url = f"{settings.ai_gateway_url}/openai/models"
    try:
        timeout = aiohttp.ClientTimeout(total=min(settings.upstream_timeout_seconds, 15))
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, headers=headers) as response:
            body = await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return False, f"unreachable ({type(exc).__name__})"
    if response.status == 401 and ("2009" in body or "Unauthorized" in body):
        which = "refused AI_GATEWAY_TOKEN" if settings.ai_gateway_token else "needs AI_GATEWAY_TOKEN"
        return False, f"reachable, but the gateway {which} (401)"
    if response.status == 404 or response.status >= 500:
        return False, f"reachable, but it answered {response.status}: is AI_GATEWAY_URL the gateway's endpoint?"
    return True, f"reachable, token accepted (the provider answered {response.status})"


def check_command(args: argparse.Namespace, settings: Settings) -> int:
    upstreams, _ = enabled_upstreams(settings)
    rows: list[dict[str, Any]] = [{"check": "settings", "ok": True, "detail": "valid"}]
    modes = {slug: upstream_mode(upstream) for slug, (_, upstream) in upstreams.items()}
    rows.append(
        {
            "check": "providers",
            "ok": any(m != "unavailable" for m in modes.values()),
            "detail": ", ".join(f"{slug}={mode}" for slug, mode in modes.items()),
        }
    )

    if settings.admin_api_key:
        rows.append({"check": "admin_api_key", "ok": True, "detail": "set"})
    else:
        rows.append({"check": "admin_api_key", "ok": False, "warning": True, "detail": "unset — token API disabled"})

    async def store_and_gateway() -> None:
        ok, detail = await inspect_store(settings)
        rows.append({"check": "store", "ok": ok, "detail": detail})
        ok, verdict = await reach_gateway(settings)
        rows.append({"check": "ai_gateway", "ok": ok, "detail": verdict})

    asyncio.run(store_and_gateway())
    healthy = all(row["ok"] for row in rows)
    if args.json:
        print(orjson.dumps({"ok": healthy, "checks": rows}, option=orjson.OPT_INDENT_2).decode())
    else:
        shown = [{**r, "ok": "ok" if r["ok"] else "WARN" if r.get("warning") else "FAIL"} for r in rows]
        print(table(shown, ["check", "ok", "detail"]))
        print("\nverdict: " + ("ready to serve" if healthy else "not ready"))
    return OK if healthy else UNAVAILABLE


def schema_verdict(version: int) -> tuple[bool, str]:
    latest = latest_version()
    if version == latest:
        return True, "reachable, schema up to date"
    if version < latest:
        return True, f"reachable, schema at version {version} of {latest}: the rest is applied at start"
    return False, f"reachable, but its schema (version {version}) is newer than this gateway's ({latest})"


async def inspect_store(settings: Settings) -> tuple[bool, str]:
    """Reach the database without changing it: no file created, no migration applied."""
    if settings.database_dsn is not None:
        import asyncpg

        try:
            conn = await asyncpg.connect(settings.database_dsn, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return False, f"cannot reach PostgreSQL: {type(exc).__name__}: {exc}"
        try:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            version = await conn.fetchval("SELECT max(version) FROM schema_migrations") if exists else 0
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return False, f"PostgreSQL refused the schema check: {type(exc).__name__}: {exc}"
        finally:
            await conn.close()
        return schema_verdict(int(version or 0))
    assert settings.database_path is not None
    return sqlite_verdict(settings.database_path)


def sqlite_verdict(path: Path) -> tuple[bool, str]:
    if not path.exists():
        return True, f"no database yet at {path}: it is created at first start (or by gateway tokens create)"
    try:
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=5)
        try:
            tables = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()
            version = db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] if tables else 0
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, f"cannot read SQLite database at {path}: {exc}"
    return schema_verdict(int(version or 0))


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import ADDRESS_IN_USE, CannotListen, serve

    try:  # the Procfile's runner: one server configuration however the gateway is started
        return serve(settings, host=args.host, port=args.port, workers=args.workers)
    except CannotListen as exc:
        raise CommandFailed(f"cannot listen: {exc}", ADDRESS_IN_USE) from None


def mock_upstream_command(args: argparse.Namespace, settings: Settings) -> int:
    from service.mock_upstream import main as serve_mock

    serve_mock(host=args.host, port=args.port, token=args.token, show=args.show)
    return OK


def page_limit(raw: str) -> int:
    value = whole_number(raw)
    if value is None or not 1 <= value <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_PAGE}, got {raw!r}")
    return value


def port_number(raw: str) -> int:
    value = whole_number(raw)
    if value is None or not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {raw!r}")
    return value


def limit_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--requests-per-minute", metavar="N", help="requests in any 60 seconds")
    command.add_argument("--tokens-per-minute", metavar="N", help="tokens (input + output) in any 60 seconds")
    command.add_argument("--max-concurrent", metavar="N", help="requests in flight at once")
    command.add_argument("--budget-usd", metavar="USD", help="spend per budget period, e.g. 100 or 0.5")
    command.add_argument("--budget-period", metavar="PERIOD", help="day, week, month (default) or total")


def add_governance_options(command: argparse.ArgumentParser, *, expires: bool) -> None:
    if expires:
        command.add_argument(
            "--expires", help="30d, 12h, 15m, 90s from now, or a time like 2026-12-31T18:00:00Z (never: no expiry)"
        )
    command.add_argument("--allow-models", help="comma-separated model globs: gpt-4o*,claude-3-5-* (none: no list)")
    command.add_argument("--allow-providers", help="comma-separated provider slugs: openai,anthropic (none: no list)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gateway", description="AI gateway: serve, manage team keys, check set-up.")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (as the Procfile does)")
    serve.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 8787")
    serve.add_argument("--workers", type=int, default=None, help="default: $WEB_CONCURRENCY or 1")
    serve.set_defaults(run=serve_command)

    tokens = commands.add_parser("tokens", help="create, list, show, rotate and revoke team keys")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="issue a key for a team")
    create.add_argument("--team", required=True, help="team id (1-128 characters)")
    create.add_argument("--name", help="team name (defaults to the team id)")
    add_governance_options(create, expires=True)
    listing = actions.add_parser("list", help="list keys (ids and prefixes only, never the keys)")
    listing.add_argument("--limit", type=page_limit, default=100, help=f"1-{MAX_PAGE} (default 100)")
    listing.add_argument("--team", help="only this team's keys")
    for name, text in (("show", "show a key's team"), ("rotate", "replace a key"), ("revoke", "delete a key")):
        action = actions.add_parser(name, help=text)
        action.add_argument("key", help="the team key, sk_…")
    actions.choices["rotate"].add_argument(
        "--grace", help="the old secret keeps working this long beside the new one: 3600, 1h, 2d (at most 7d)"
    )
    for action in (*actions.choices.values(), tokens):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    tokens.set_defaults(run=tokens_command)

    keys = commands.add_parser("keys", help="show, limit and revoke keys by their id (key_…), without the key")
    key_actions = keys.add_subparsers(dest="action", required=True)
    for name, text in (
        ("show", "show a key by its id, with its allow-lists, expiry and limits"),
        ("revoke", "revoke a key by its id"),
        ("set-limits", "set a key's limits ('none' clears one)"),
        ("update", "change a key's allow-lists or expiry"),
    ):
        action = key_actions.add_parser(name, help=text)
        action.add_argument("key_id", metavar="KEYID", help="the key's id, key_…")
    limit_options(key_actions.choices["set-limits"])
    add_governance_options(key_actions.choices["update"], expires=True)
    for action in (*key_actions.choices.values(), keys):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    keys.set_defaults(run=keys_command)

    teams = commands.add_parser("teams", help="list teams, show and set their limits, revoke their keys")
    team_actions = teams.add_subparsers(dest="action", required=True)
    team_list = team_actions.add_parser("list", help="teams that have keys, with their limits")
    team_list.add_argument("--limit", type=page_limit, default=100, help=f"1-{MAX_PAGE} (default 100)")
    for name, text in (
        ("show", "show a team's limits (and state, with REDIS_URL) and allow-lists"),
        ("set-limits", "set a team's limits ('none' clears one)"),
        ("update", "change a team's allow-lists (for all its keys)"),
        ("revoke-keys", "revoke every key of a team"),
    ):
        action = team_actions.add_parser(name, help=text)
        action.add_argument("team_id", metavar="TEAMID")
    limit_options(team_actions.choices["set-limits"])
    add_governance_options(team_actions.choices["update"], expires=False)
    for action in (*team_actions.choices.values(), teams):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    teams.set_defaults(run=teams_command)

    trail = commands.add_parser("audit", help="the audit trail of key and team changes, newest first")
    trail.add_argument("--team", help="only this team")
    trail.add_argument("--key", metavar="KEYID", help="only this key (its id, key_…)")
    trail.add_argument("--action", help=f"only this action ({', '.join(audit.ACTIONS)})")
    trail.add_argument("--since", help="7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z")
    trail.add_argument("--until", help="excluded, same forms")
    trail.add_argument("--limit", type=page_limit, default=100, help=f"1-{MAX_PAGE} (default 100)")
    trail.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    trail.set_defaults(run=audit_command)

    usage = commands.add_parser("usage", help="usage and cost from the ledger, grouped and filtered")
    usage.add_argument("--team", help="only this team")
    usage.add_argument("--key", metavar="KEYID", help="only this key (its id, key_…)")
    usage.add_argument("--provider", help="only this provider (slug)")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--since", help="7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z (default: 30 days to today)")
    usage.add_argument("--until", help="excluded, same forms (default: the end of today, UTC)")
    usage.add_argument("--by", help="comma-separated: hour, day, team, key, provider, model (default: day)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    output.add_argument("--csv", action="store_true", help="CSV, costs in dollars")
    usage.set_defaults(run=usage_command)

    check = commands.add_parser("check", help="validate settings, reach the store and Cloudflare AI Gateway")
    check.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    check.set_defaults(run=check_command)

    mock = commands.add_parser("mock-upstream", help="run the bundled fake Cloudflare AI Gateway")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=port_number, default=8788)
    mock.add_argument("--token", default=None, help="require cf-aig-authorization: Bearer TOKEN")
    mock.add_argument("--show", action="store_true", help="print one JSON line per request received")
    mock.set_defaults(run=mock_upstream_command)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # library log lines go to stderr, and only warnings: stdout is the command's output
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        settings = Settings.from_env()
        code: int = args.run(args, settings)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return CONFIGURATION
    except StoreUnavailableError as exc:
        print(f"gateway: store unavailable: {exc}", file=sys.stderr)
        return UNAVAILABLE
    except CommandFailed as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # e.g. a port already taken
        print(f"gateway: {exc.strerror or exc}", file=sys.stderr)
        return UNAVAILABLE
    return code


if __name__ == "__main__":
    sys.exit(main())
