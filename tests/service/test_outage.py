"""A PostgreSQL outage: verified keys ride it out for a grace period, everything else gets 503,
and the gateway recovers by itself when the database returns."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.postgres import TcpProxy
from tests.support import ADMIN_KEY, BIN, GatewayProcess, free_port, gateway_env, wait_until


def status(gateway: GatewayProcess, key: str) -> int:
    return httpx.get(f"{gateway.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code


def metrics_text(gateway: GatewayProcess) -> str:
    return httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text


def test_outage_grace_503s_and_recovery(
    make_gateway: Callable[..., GatewayProcess], pg_dsn: str, pg_proxy: TcpProxy
) -> None:
    dsn = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}")
    gw = make_gateway(DATABASE_URL=dsn, STORE_OUTAGE_GRACE_SECONDS="8")  # room for a busy machine
    verified = gw.create_key("team_verified")
    unseen = gw.create_key("team_unseen")
    # a key written empties every worker's cache at its next refresh (every 0.25 s): let that happen before
    # the key is verified, or it could empty the cache between the verification and the outage
    time.sleep(1.0)
    assert status(gw, verified) == 200

    pg_proxy.down()
    wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 503, 5)
    outage_started = time.monotonic()
    assert status(gw, verified) == 200  # already verified: keeps working in the grace period
    unseen_response = httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {unseen}"})
    assert unseen_response.status_code == 503  # not 401: the gateway cannot know
    assert "unavailable" in unseen_response.json()["error"]["message"]
    token_api = httpx.post(f"{gw.url}/tokens", json={"teamId": "t"}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert token_api.status_code == 503 and "error" in token_api.json()
    # the token API speaks for the store, not the cache
    wait_until(lambda: httpx.get(f"{gw.url}/tokens/{verified}").status_code == 503, 2)
    assert httpx.post(f"{gw.url}/tokens/{verified}/refresh").status_code == 503
    ready = httpx.get(f"{gw.url}/readyz").json()
    assert ready["status"] == "unavailable" and ready["grace_seconds"] == 8
    wait_until(lambda: "gateway_store_degraded 1.0" in metrics_text(gw), 2)  # published once a second
    assert "gateway_store_degraded 1.0" in metrics_text(gw)

    wait_until(lambda: status(gw, verified) == 503, 15)  # the grace period is over
    assert time.monotonic() - outage_started >= 5  # kept for most of the grace, however late the outage was seen
    assert [line["event"] for line in gw.log_lines()].count("store_unavailable") == 1

    pg_proxy.up()
    wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, 10)
    assert status(gw, verified) == 200 and status(gw, unseen) == 200
    assert gw.create_key("team_after")
    wait_until(lambda: any(line["event"] == "store_recovered" for line in gw.log_lines()), 2)
    wait_until(lambda: "gateway_store_degraded 0.0" in metrics_text(gw), 3)
    assert "Traceback" not in gw.log_text()


def test_a_replica_without_its_database_stops_with_one_line(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path, DATABASE_URL="postgresql://root@127.0.0.1:1/test")
    result = subprocess.run(
        [str(BIN / "uvicorn"), "--factory", "service.app:create_app", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert '"event":"store_unavailable_at_start"' in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
