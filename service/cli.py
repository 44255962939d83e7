"""The ``gateway`` command: serve, manage keys on the configured database, check the set-up.

    gateway serve [--host H] [--port P] [--workers N]
    gateway tokens create --team T [--name N] | list [--limit N] | show KEY | rotate KEY | revoke KEY
    gateway check
    gateway mock-upstream [--port P] [--token T]

Key commands work on the database directly (no HTTP call, no admin key), so the first key needs
nothing running. Tables for people, ``--json`` for scripts. Exit codes: 0 done, 1 no such key,
2 usage, 3 configuration error, 4 store or Cloudflare AI Gateway unreachable or refusing, 5 the
address to listen on is in use (``serve``).
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import structlog

from config import Settings, SettingsError
from service.store import StoreUnavailableError, TokenRecord, store_for
from service.teams import TeamDirectory
from service.tokens import MAX_NAME, MAX_TEAM_ID, issued_json, record_json, team_json

OK, NOT_FOUND, USAGE, CONFIGURATION, UNAVAILABLE = 0, 1, 2, 3, 4


class CommandFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("" if row.get(c) is None else str(row[c])) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(args: argparse.Namespace, rows: Sequence[dict[str, Any]], columns: Sequence[str], *, single: bool) -> None:
    if args.json:
        print(orjson.dumps(rows[0] if single else list(rows), option=orjson.OPT_INDENT_2).decode())
    elif single:
        width = max(len(c) for c in columns)
        print("\n".join(f"{c.ljust(width)}  {'' if rows[0].get(c) is None else rows[0][c]}" for c in columns))
    else:
        print(table(rows, columns))


async def with_directory(settings: Settings, work: Callable[[TeamDirectory], Awaitable[int]]) -> int:
    store = store_for(settings)
    await store.open()
    try:
        return await work(TeamDirectory(store))
    finally:
        await store.close()


def tokens_command(args: argparse.Namespace, settings: Settings) -> int:
    team_columns = ["apiKey", "teamId", "name", "createdAt"]

    async def create(directory: TeamDirectory) -> int:
        if not args.team.strip() or len(args.team) > MAX_TEAM_ID or (args.name and len(args.name) > MAX_NAME):
            raise CommandFailed(f"--team must be 1-{MAX_TEAM_ID} characters and --name at most {MAX_NAME}", USAGE)
        key, team = await directory.issue(args.team, args.name or args.team)
        emit(args, [issued_json(key, team)], team_columns, single=True)
        return OK

    async def listing(directory: TeamDirectory) -> int:
        rows: list[tuple[TokenRecord, str]] = await directory.store.list(args.limit)
        emit(
            args,
            [record_json(record) for record, _ in rows],
            ["keyPrefix", "teamId", "name", "createdAt", "lastUsedAt"],
            single=False,
        )
        return OK

    async def show(directory: TeamDirectory) -> int:
        team = await directory.resolve(args.key)
        if team is None:
            raise CommandFailed("no such key", NOT_FOUND)
        emit(
            args,
            [team_json(team)],
            ["teamId", "name", "createdAt"],
            single=True,
        )
        return OK

    async def rotate(directory: TeamDirectory) -> int:
        rotated = await directory.rotate(args.key)
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
    from providers.mount import mount_providers  # the providers need the settings first

    mounts, _ = mount_providers(settings)
    rows: list[dict[str, Any]] = [{"check": "settings", "ok": True, "detail": "valid"}]
    modes = {
        slug: ("gateway" if m.via_gateway else "direct") if m.available else "unavailable" for slug, m in mounts.items()
    }
    rows.append(
        {
            "check": "providers",
            "ok": any(m != "unavailable" for m in modes.values()),
            "detail": ", ".join(f"{slug}={mode}" for slug, mode in modes.items()),
        }
    )

    async def store_and_gateway() -> None:
        store = store_for(settings)
        try:
            await store.open()
            await store.ping()
            rows.append({"check": "store", "ok": True, "detail": "reachable, schema up to date"})
        except StoreUnavailableError as exc:
            rows.append({"check": "store", "ok": False, "detail": str(exc)})
        finally:
            await store.close()
        ok, verdict = await reach_gateway(settings)
        rows.append({"check": "ai_gateway", "ok": ok, "detail": verdict})

    asyncio.run(store_and_gateway())
    healthy = all(row["ok"] for row in rows)
    if args.json:
        print(orjson.dumps({"ok": healthy, "checks": rows}, option=orjson.OPT_INDENT_2).decode())
    else:
        print(table([{**r, "ok": "ok" if r["ok"] else "FAIL"} for r in rows], ["check", "ok", "detail"]))
        print("\nverdict: " + ("ready to serve" if healthy else "not ready"))
    return OK if healthy else UNAVAILABLE


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import ADDRESS_IN_USE, CannotListen, serve

    try:  # the Procfile's runner: one server configuration however the gateway is started
        return serve(settings, host=args.host, port=args.port, workers=args.workers)
    except CannotListen as exc:
        raise CommandFailed(f"cannot listen: {exc}", ADDRESS_IN_USE) from None


def mock_upstream_command(args: argparse.Namespace, settings: Settings) -> int:
    from service.mock_upstream import main as serve_mock

    serve_mock(host=args.host, port=args.port, token=args.token)
    return OK


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
    listing = actions.add_parser("list", help="list keys (prefixes only, never the keys)")
    listing.add_argument("--limit", type=int, default=100)
    for name, text in (("show", "show a key's team"), ("rotate", "replace a key"), ("revoke", "delete a key")):
        action = actions.add_parser(name, help=text)
        action.add_argument("key", help="the team key, sk_…")
    for action in (*actions.choices.values(), tokens):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    tokens.set_defaults(run=tokens_command)

    check = commands.add_parser("check", help="validate settings, reach the store and Cloudflare AI Gateway")
    check.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    check.set_defaults(run=check_command)

    mock = commands.add_parser("mock-upstream", help="run the bundled fake Cloudflare AI Gateway")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8788)
    mock.add_argument("--token", default=None, help="require cf-aig-authorization: Bearer TOKEN")
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
