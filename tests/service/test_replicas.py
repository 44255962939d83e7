"""Several gateway processes on one PostgreSQL database behave as one gateway."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support import ADMIN_KEY, GatewayProcess, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def status(gateway: GatewayProcess, key: str) -> int:
    return httpx.get(f"{gateway.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code


def refused_within(gateway: GatewayProcess, key: str, seconds: float = 1.0) -> None:
    """The revocation bound: another replica refuses the key within ``seconds`` (by NOTIFY)."""
    wait_until(lambda: status(gateway, key) == 401, seconds, f"{gateway.url} refusing the key")


def test_two_replicas_share_keys_and_revocations(make_gateway: Callable[..., GatewayProcess], pg_dsn: str) -> None:
    a = make_gateway(DATABASE_URL=pg_dsn)
    b = make_gateway(DATABASE_URL=pg_dsn)

    key = a.create_key("team_shared", "Shared")
    assert status(b, key) == 200  # created on A, used on B at once
    assert httpx.get(f"{b.url}/tokens/{key}").json()["teamId"] == "team_shared"
    assert status(a, key) == 200  # both now have it cached

    assert httpx.delete(f"{b.url}/tokens/{key}", headers=ADMIN).status_code == 204
    refused_within(a, key)
    assert status(b, key) == 401

    second = b.create_key("team_rotate", "Rotate")
    assert status(a, second) == 200
    rotated = httpx.post(f"{b.url}/tokens/{second}/refresh").json()["apiKey"]
    refused_within(a, second)
    assert status(a, rotated) == 200 and status(b, rotated) == 200


def test_two_workers_on_postgres(make_gateway: Callable[..., GatewayProcess], pg_dsn: str) -> None:
    gw = make_gateway(DATABASE_URL=pg_dsn, workers=2)
    key = gw.create_key()
    # fresh connections spread over both workers; all of them know the key, then all refuse it
    assert {status(gw, key) for _ in range(30)} == {200}
    assert httpx.delete(f"{gw.url}/tokens/{key}", headers=ADMIN).status_code == 204
    wait_until(lambda: {status(gw, key) for _ in range(30)} == {401}, 10, "every worker refusing the key")
