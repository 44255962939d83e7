"""The `gateway` command through its real entry point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import orjson

from service.mock_upstream import MockUpstream
from tests.support import BIN, GATEWAY_TOKEN, free_port, gateway_env, launch, start_gateway, wait_for_port


def gateway(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gateway"), *args], env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_key_lifecycle_on_the_database_directly(tmp_path: Path, upstream: MockUpstream) -> None:
    env = gateway_env(upstream.url, tmp_path)
    created = gateway(env, "tokens", "create", "--team", "team_cli", "--name", "CLI Team")
    assert created.returncode == 0, created.stderr
    key = re.search(r"sk_[0-9a-f]{64}", created.stdout).group(0)  # type: ignore[union-attr]
    assert "team_cli" in created.stdout and "CLI Team" in created.stdout

    as_json = orjson.loads(gateway(env, "tokens", "create", "--team", "team_two", "--json").stdout)
    governance = {"allowedModels", "allowedProviders", "expiresAt", "expired"}
    assert set(as_json) == {"apiKey", "keyId", "teamId", "name", "createdAt", *governance}
    assert as_json["name"] == "team_two" and as_json["expired"] is False
    assert re.fullmatch(r"key_[0-9a-f]{16}", as_json["keyId"])

    listed = gateway(env, "tokens", "list", "--json")
    rows = orjson.loads(listed.stdout)
    assert [row["teamId"] for row in rows] == ["team_cli", "team_two"]
    assert rows[0]["keyPrefix"] == key[:8] + "…" and key not in listed.stdout
    assert rows[1]["keyId"] == as_json["keyId"]
    table = gateway(env, "tokens", "list").stdout.splitlines()
    header = ["keyId", "keyPrefix", "teamId", "name", "createdAt", "lastUsedAt", "expiresAt", "expired"]
    assert table[0].split() == header and len(table) == 3
    only = orjson.loads(gateway(env, "tokens", "list", "--team", "team_two", "--json").stdout)
    assert [row["keyId"] for row in only] == [as_json["keyId"]]

    # the first key works through a gateway on the same database, no HTTP call or admin key needed
    served = start_gateway(env, tmp_path)
    try:
        response = httpx.get(f"{served.url}/openai/models", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
    finally:
        served.stop()

    shown = orjson.loads(gateway(env, "tokens", "show", key, "--json").stdout)
    assert shown["teamId"] == "team_cli" and shown["keyId"] == rows[0]["keyId"]
    rotated_json = orjson.loads(gateway(env, "tokens", "rotate", key, "--json").stdout)
    rotated = rotated_json["apiKey"]
    assert rotated != key and rotated_json["keyId"] == shown["keyId"]
    missing = gateway(env, "tokens", "show", key)
    assert missing.returncode == 1 and missing.stderr.strip() == "gateway: no such key" and missing.stdout == ""
    assert gateway(env, "tokens", "revoke", rotated).returncode == 0
    assert gateway(env, "tokens", "revoke", rotated).returncode == 1


def test_errors_are_one_line_with_meaningful_exit_codes(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path, MAX_REQUEST_BYTES="lots")
    bad = gateway(env, "tokens", "list")
    assert bad.returncode == 3 and bad.stderr.count("\n") == 1 and "MAX_REQUEST_BYTES" in bad.stderr
    down = gateway(gateway_env(None, tmp_path, DATABASE_URL="postgresql://root@127.0.0.1:1/test"), "tokens", "list")
    assert (
        down.returncode == 4 and down.stderr.startswith("gateway: store unavailable") and "Traceback" not in down.stderr
    )
    usage = gateway(gateway_env(None, tmp_path), "tokens", "create")
    assert usage.returncode == 2


def test_check_gives_a_verdict(tmp_path: Path, upstream: MockUpstream) -> None:
    fresh = gateway(gateway_env(upstream.url, tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/new/g.db"), "check")
    assert fresh.returncode == 0 and "no database yet at" in fresh.stdout, fresh.stdout
    assert not (tmp_path / "new").exists()  # checking creates nothing

    assert gateway(gateway_env(upstream.url, tmp_path), "tokens", "create", "--team", "t").returncode == 0
    good = gateway(gateway_env(upstream.url, tmp_path), "check", "--json")
    report = orjson.loads(good.stdout)
    assert good.returncode == 0 and report["ok"] is True, good.stdout
    assert {row["check"] for row in report["checks"]} == {
        "settings",
        "providers",
        "admin_api_key",
        "store",
        "ai_gateway",
    }
    store = next(row for row in report["checks"] if row["check"] == "store")
    assert store["detail"] == "reachable, schema up to date"

    no_admin = gateway(gateway_env(upstream.url, tmp_path, ADMIN_API_KEY=""), "check")
    assert no_admin.returncode == 4 and "verdict: not ready" in no_admin.stdout
    assert "unset — token API disabled" in no_admin.stdout and "WARN" in no_admin.stdout

    wrong_token = gateway(gateway_env(upstream.url, tmp_path, AI_GATEWAY_TOKEN="not-the-token"), "check")
    assert wrong_token.returncode == 4 and "refused AI_GATEWAY_TOKEN" in wrong_token.stdout
    assert "verdict: not ready" in wrong_token.stdout and "not-the-token" not in wrong_token.stdout

    nowhere = gateway(gateway_env(f"http://127.0.0.1:{free_port()}", tmp_path), "check")
    assert nowhere.returncode == 4 and "unreachable" in nowhere.stdout


def test_mock_upstream_command(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "gateway"), "mock-upstream", "--port", str(port), "--token", GATEWAY_TOKEN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        wait_for_port(port, 10)
        response = httpx.post(
            f"http://127.0.0.1:{port}/openai/chat/completions",
            json={"model": "m"},
            headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"},
        )
        assert response.status_code == 200 and response.json()["object"] == "chat.completion"
        assert httpx.get(f"http://127.0.0.1:{port}/openai/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)


def test_serve_runs_the_gateway(tmp_path: Path, upstream: MockUpstream) -> None:
    port = free_port()
    env = gateway_env(upstream.url, tmp_path)
    command = [str(BIN / "gateway"), "serve", "--port", str(port), "--workers", "1"]
    process = launch(command, env, tmp_path, port, ready_path="/readyz").process
    try:
        key = orjson.loads(gateway(env, "tokens", "create", "--team", "t", "--json").stdout)["apiKey"]
        models = httpx.get(f"http://127.0.0.1:{port}/openai/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def test_keys_by_id_and_a_teams_keys(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path)
    first = orjson.loads(gateway(env, "tokens", "create", "--team", "team_a", "--json").stdout)
    second = orjson.loads(gateway(env, "tokens", "create", "--team", "team_a", "--json").stdout)
    other = orjson.loads(gateway(env, "tokens", "create", "--team", "team_b", "--json").stdout)
    shown = gateway(env, "keys", "show", first["keyId"], "--json")
    record = orjson.loads(shown.stdout)
    assert record["keyId"] == first["keyId"] and record["keyPrefix"] == first["apiKey"][:8] + "…"
    assert first["apiKey"] not in shown.stdout
    assert "keyPrefix" in gateway(env, "keys", "show", first["keyId"]).stdout

    assert gateway(env, "keys", "revoke", first["keyId"]).returncode == 0
    for command in (
        ("keys", "revoke", first["keyId"]),
        ("keys", "show", first["keyId"]),
        ("tokens", "show", first["apiKey"]),
    ):
        missing = gateway(env, *command)
        assert missing.returncode == 1 and missing.stderr.strip() == "gateway: no such key"
    assert gateway(env, "keys", "show", "key_nothex").returncode == 1

    revoked = orjson.loads(gateway(env, "teams", "revoke-keys", "team_a", "--json").stdout)
    assert revoked == {"teamId": "team_a", "revoked": 1}
    assert gateway(env, "tokens", "show", second["apiKey"]).returncode == 1
    assert gateway(env, "tokens", "show", other["apiKey"]).returncode == 0
    assert "0" in gateway(env, "teams", "revoke-keys", "team_a").stdout


def test_team_ids_names_and_limits_are_checked_as_the_api_checks_them(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path)
    for arguments in (
        ("--team", "team\x1b[2J"),
        ("--team", "ok", "--name", "evil\x1b]0;owned\x07"),
        ("--team", "ok", "--name", "two\nlines"),
        ("--team", "   "),
        ("--team", "t" * 129),
        ("--team", "ok", "--name", ""),
    ):
        refused = gateway(env, "tokens", "create", *arguments)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (arguments, refused.stderr)
        assert "\x1b" not in refused.stderr
    for limit in ("-5", "0", "501", "\u00b2", "\uff15", "1_0", " 5"):
        refused = gateway(env, "tokens", "list", "--limit", limit)
        assert refused.returncode == 2 and "--limit" in refused.stderr, (limit, refused.stderr)
    assert gateway(env, "tokens", "list", "--limit", "500").returncode == 0
    assert gateway(env, "mock-upstream", "--port", "\uff18\uff17\uff18\uff18").returncode == 2


def test_tables_escape_what_would_drive_the_terminal(tmp_path: Path) -> None:
    """Names stored before the CLI checked them (or by an older version) print escaped."""
    import sqlite3

    env = gateway_env(None, tmp_path)
    created = orjson.loads(gateway(env, "tokens", "create", "--team", "team_esc", "--json").stdout)
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        db.execute("UPDATE tokens SET name = ?", ("evil\x1b[2J\x9b31m\nname",))
    for command in (("tokens", "list"), ("keys", "show", created["keyId"]), ("tokens", "show", created["apiKey"])):
        out = gateway(env, *command).stdout
        assert "\x1b" not in out and "\x9b" not in out and "evil\\x1b[2J\\x9b31m\\nname" in out, out
    as_json = orjson.loads(gateway(env, "tokens", "list", "--json").stdout)
    assert as_json[0]["name"] == "evil\x1b[2J\x9b31m\nname"  # JSON carries it exactly, escaped by JSON itself


def test_check_reads_postgresql_without_migrating_it(tmp_path: Path, upstream: MockUpstream, pg_dsn: str) -> None:
    import asyncio

    import asyncpg

    empty = gateway(gateway_env(upstream.url, tmp_path, DATABASE_URL=pg_dsn), "check", "--json")
    store = next(row for row in orjson.loads(empty.stdout)["checks"] if row["check"] == "store")
    assert store["ok"] is True and "schema at version 0" in store["detail"], store

    async def tables() -> list[str]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return [
                row[0]
                for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            ]
        finally:
            await conn.close()

    assert asyncio.run(tables()) == []
    assert gateway(gateway_env(upstream.url, tmp_path, DATABASE_URL=pg_dsn), "tokens", "list").returncode == 0
    migrated = gateway(gateway_env(upstream.url, tmp_path, DATABASE_URL=pg_dsn), "check")
    assert migrated.returncode == 0 and "schema up to date" in migrated.stdout


def test_team_and_key_limits_on_the_database_directly(
    tmp_path: Path, upstream: MockUpstream, redis_prefix: str
) -> None:
    env = gateway_env(upstream.url, tmp_path)
    key_id = orjson.loads(gateway(env, "tokens", "create", "--team", "team_lim", "--name", "Lim", "--json").stdout)[
        "keyId"
    ]
    listed = gateway(env, "teams", "list").stdout.splitlines()
    assert listed[0].split()[:4] == ["teamId", "name", "keyCount", "requestsPerMinute"]
    assert listed[1].split() == ["team_lim", "Lim", "1"]

    set_team = gateway(env, "teams", "set-limits", "team_lim", "--requests-per-minute", "60", "--budget-usd", "12.5")
    assert set_team.returncode == 0, set_team.stderr
    assert "budgetPeriod" in set_team.stdout and "month" in set_team.stdout
    shown = orjson.loads(gateway(env, "teams", "show", "team_lim", "--json").stdout)
    assert shown["limits"] == {
        "requestsPerMinute": 60,
        "tokensPerMinute": None,
        "maxConcurrent": None,
        "budgetUsd": 12.5,
        "budgetPeriod": "month",
    }
    assert shown["state"] is None  # without REDIS_URL the figures live in the running gateway
    cleared = gateway(env, "teams", "set-limits", "team_lim", "--requests-per-minute", "none", "--json")
    assert orjson.loads(cleared.stdout)["limits"]["requestsPerMinute"] is None

    set_key = gateway(env, "keys", "set-limits", key_id, "--max-concurrent", "3", "--json")
    assert orjson.loads(set_key.stdout)["limits"]["maxConcurrent"] == 3
    assert "maxConcurrent" in gateway(env, "keys", "show", key_id).stdout
    with_redis = {**env, "REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_KEY_PREFIX": redis_prefix}
    state = orjson.loads(gateway(with_redis, "keys", "show", key_id, "--json").stdout)["state"]
    assert state["inFlight"] == 0 and state["spentUsd"] is None
    table = gateway(with_redis, "keys", "show", key_id).stdout
    assert all(name in table for name in ("periodStart", "tokensThisMinute", "requestsThisMinute", "inFlight"))
    exponent = gateway(env, "teams", "set-limits", "team_lim", "--budget-usd", "1e3", "--json")  # as JSON takes it
    assert orjson.loads(exponent.stdout)["limits"]["budgetUsd"] == 1000

    for args, code, message in [
        (("teams", "set-limits", "team_lim"), 2, "needs at least one of"),
        (("teams", "set-limits", "team_lim", "--max-concurrent", "x"), 2, "--max-concurrent must be a number"),
        (
            ("teams", "set-limits", "team_lim", "--max-concurrent", "-5"),
            2,
            "limits.maxConcurrent",
        ),  # a number, out of range
        (("teams", "set-limits", "team_lim", "--budget-usd", "-1"), 2, "limits.budgetUsd"),
        (("teams", "set-limits", "team_lim", "--budget-period", "year"), 2, "limits.budgetPeriod"),
        (("keys", "set-limits", "key_0000000000000000", "--max-concurrent", "1"), 1, "no such key"),
        (("teams", "show", "team_nobody"), 1, "no such team"),
    ]:
        failed = gateway(env, *args)
        assert failed.returncode == code and message in failed.stderr, failed.stderr
    several = gateway({**env, "WEB_CONCURRENCY": "2"}, "teams", "set-limits", "team_lim", "--max-concurrent", "2")
    assert several.returncode == 3 and "REDIS_URL" in several.stderr


def test_expiry_allow_lists_rotation_grace_and_the_audit_trail(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path)
    created = orjson.loads(
        gateway(
            env,
            "tokens",
            "create",
            "--team",
            "team_gov",
            "--expires",
            "12h",
            "--allow-models",
            "gpt-4o*, o3-*",
            "--json",
        ).stdout
    )
    assert created["allowedModels"] == ["gpt-4o*", "o3-*"] and created["expiresAt"] > created["createdAt"]
    at = orjson.loads(
        gateway(env, "tokens", "create", "--team", "team_gov", "--expires", "2030-06-01", "--json").stdout
    )
    assert at["expiresAt"] == "2030-06-01T00:00:00.000Z"
    key_id = created["keyId"]
    for args, named in (
        (("tokens", "create", "--team", "t", "--expires", "soon"), "--expires"),
        (("tokens", "create", "--team", "t", "--expires", "2999-01-01"), "--expires"),
        (("tokens", "create", "--team", "t", "--expires", "never"), "--expires"),
        (("tokens", "create", "--team", "t", "--allow-providers", "nope"), "--allow-providers"),
        (("keys", "update", key_id, "--allow-models", "a\tb"), "--allow-models"),
        (("tokens", "rotate", created["apiKey"], "--grace", "8d"), "--grace"),
        (("tokens", "rotate", created["apiKey"], "--grace", "soon"), "--grace"),
        (("audit", "--action", "nope"), "--action"),
        (("audit", "--since", "soon"), "--since"),
    ):
        failed = gateway(env, *args)
        assert failed.returncode == 2 and named in failed.stderr, (args, failed.stderr)
    assert gateway(env, "keys", "update", "key_0000000000000000", "--expires", "never").returncode == 1
    assert gateway(env, "teams", "show", "team_nobody").returncode == 1

    updated = orjson.loads(
        gateway(env, "keys", "update", key_id, "--expires", "never", "--allow-models", "none", "--json").stdout
    )
    assert (updated["expiresAt"], updated["allowedModels"]) == (None, None)
    team = gateway(env, "teams", "update", "team_gov", "--allow-providers", "openai,anthropic")
    assert team.returncode == 0 and "openai, anthropic" in team.stdout
    shown = orjson.loads(gateway(env, "teams", "show", "team_gov", "--json").stdout)
    assert shown["allowedProviders"] == ["openai", "anthropic"] and shown["keyCount"] == 2
    rotated = gateway(env, "tokens", "rotate", created["apiKey"], "--grace", "1h", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_key = orjson.loads(rotated.stdout)["apiKey"]
    old_shown = gateway(env, "tokens", "show", created["apiKey"], "--json")
    assert old_shown.returncode == 0  # still accepted during the grace period

    trail = orjson.loads(gateway(env, "audit", "--team", "team_gov", "--json").stdout)
    assert [(e["action"], e["actor"]) for e in reversed(trail)] == [
        ("key.created", "cli"),
        ("key.created", "cli"),
        ("key.updated", "cli"),
        ("team.updated", "cli"),
        ("key.rotated", "cli"),
    ]
    listed = gateway(env, "audit", "--key", key_id, "--since", "1h", "--limit", "2")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3  # header + 2 newest
    everything = orjson.dumps(trail).decode() + listed.stdout
    assert created["apiKey"] not in everything and new_key not in everything and new_key[3:20] not in everything
