"""A PostgreSQL outage: verified keys ride it out for a grace period, everything else gets 503,
and the gateway recovers by itself when the database returns."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import ADMIN_KEY, GatewayProcess
from tests.postgres import TcpProxy


def status(gateway: GatewayProcess, key: str) -> int:
    return httpx.get(f"{gateway.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_outage_grace_503s_and_recovery(
    make_gateway: Callable[..., GatewayProcess], pg_dsn: str, pg_proxy: TcpProxy
) -> None:
    dsn = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}")
    gw = make_gateway(DATABASE_URL=dsn, STORE_OUTAGE_GRACE_SECONDS="3")
    verified = gw.create_key("team_verified")
    unseen = gw.create_key("team_unseen")
    assert status(gw, verified) == 200

    pg_proxy.down()
    wait_for(lambda: httpx.get(f"{gw.url}/readyz").status_code == 503, 5)
    outage_started = time.monotonic()
    assert status(gw, verified) == 200  # already verified: keeps working in the grace period
    unseen_response = httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {unseen}"})
    assert unseen_response.status_code == 503  # not 401: the gateway cannot know
    assert "unavailable" in unseen_response.json()["error"]["message"]
    token_api = httpx.post(f"{gw.url}/tokens", json={"teamId": "t"}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert token_api.status_code == 503 and "error" in token_api.json()
    # the token API speaks for the store, not the cache
    wait_for(lambda: httpx.get(f"{gw.url}/tokens/{verified}").status_code == 503, 2)
    assert httpx.post(f"{gw.url}/tokens/{verified}/refresh").status_code == 503
    ready = httpx.get(f"{gw.url}/readyz").json()
    assert ready["status"] == "unavailable" and ready["grace_seconds"] == 3
    time.sleep(1.1)
    assert (
        "gateway_store_degraded 1.0"
        in httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    )

    wait_for(lambda: status(gw, verified) == 503, 6)  # the grace period is over
    assert time.monotonic() - outage_started >= 2.5
    assert [line["event"] for line in gw.log_lines()].count("store_unavailable") == 1

    pg_proxy.up()
    wait_for(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, 10)
    assert status(gw, verified) == 200 and status(gw, unseen) == 200
    assert gw.create_key("team_after")
    wait_for(lambda: any(line["event"] == "store_recovered" for line in gw.log_lines()), 2)
    wait_for(
        lambda: (
            "gateway_store_degraded 0.0"
            in httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
        ),
        3,
    )
    assert "Traceback" not in gw.log_text()


def test_a_replica_without_its_database_stops_with_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.conftest import BIN, free_port, gateway_env

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
