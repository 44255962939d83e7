"""The `gateway` command through its real entry point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import orjson

from service.mock_upstream import MockUpstream
from tests.conftest import BIN, GATEWAY_TOKEN, free_port, gateway_env, start_gateway


def gateway(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gateway"), *args], env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_key_lifecycle_on_the_database_directly(tmp_path: Path, upstream: MockUpstream) -> None:
    env = gateway_env(upstream.url, tmp_path)
    created = gateway(env, "tokens", "create", "--team", "team_cli", "--name", "CLI Team")
    assert created.returncode == 0, created.stderr
    key = re.search(r"sk_[0-9a-f]{64}", created.stdout).group(0)  # type: ignore[union-attr]
    assert "team_cli" in created.stdout and "CLI Team" in created.stdout

    as_json = orjson.loads(gateway(env, "tokens", "create", "--team", "team_two", "--json").stdout)
    assert set(as_json) == {"apiKey", "teamId", "name", "createdAt"} and as_json["name"] == "team_two"

    listed = gateway(env, "tokens", "list", "--json")
    rows = orjson.loads(listed.stdout)
    assert [row["teamId"] for row in rows] == ["team_cli", "team_two"]
    assert rows[0]["keyPrefix"] == key[:8] + "…" and key not in listed.stdout
    table = gateway(env, "tokens", "list").stdout.splitlines()
    assert table[0].split() == ["keyPrefix", "teamId", "name", "createdAt", "lastUsedAt"] and len(table) == 3

    # the first key works through a gateway on the same database, no HTTP call or admin key needed
    served = start_gateway(env, tmp_path)
    try:
        response = httpx.get(f"{served.url}/openai/models", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
    finally:
        served.stop()

    assert orjson.loads(gateway(env, "tokens", "show", key, "--json").stdout)["teamId"] == "team_cli"
    rotated = orjson.loads(gateway(env, "tokens", "rotate", key, "--json").stdout)["apiKey"]
    assert rotated != key
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
    good = gateway(gateway_env(upstream.url, tmp_path), "check", "--json")
    report = orjson.loads(good.stdout)
    assert good.returncode == 0 and report["ok"] is True
    assert {row["check"] for row in report["checks"]} == {"settings", "providers", "store", "ai_gateway"}

    wrong_token = gateway(gateway_env(upstream.url, tmp_path, AI_GATEWAY_TOKEN="not-the-token"), "check")
    assert wrong_token.returncode == 4 and "refused AI_GATEWAY_TOKEN" in wrong_token.stdout
    assert "verdict: not ready" in wrong_token.stdout and "not-the-token" not in wrong_token.stdout

    nowhere = gateway(gateway_env(f"http://127.0.0.1:{free_port()}", tmp_path), "check")
    assert nowhere.returncode == 4 and "unreachable" in nowhere.stdout


def test_mock_upstream_command(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "gateway"), "mock-upstream", "--port", str(port), "--token", GATEWAY_TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/openai/chat/completions",
                    json={"model": "m"},
                    headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"},
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["object"] == "chat.completion"
        assert httpx.get(f"http://127.0.0.1:{port}/openai/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)


def test_serve_runs_the_gateway(tmp_path: Path, upstream: MockUpstream) -> None:
    port = free_port()
    env = gateway_env(upstream.url, tmp_path)
    process = subprocess.Popen(
        [str(BIN / "gateway"), "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        key = orjson.loads(gateway(env, "tokens", "create", "--team", "t", "--json").stdout)["apiKey"]
        models = httpx.get(f"http://127.0.0.1:{port}/openai/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
