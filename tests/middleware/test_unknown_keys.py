"""Key guessing: per-address limits on unknown keys, and the settings behind them."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from config import Settings, SettingsError
from middleware.key_guard import UnknownKeyGuard
from service.core import keys
from tests.postgres import TcpProxy
from tests.support import GatewayProcess, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scope(peer: str, *forwarded: str) -> dict[str, object]:
    return {"client": (peer, 50000), "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_an_address_is_held_back_after_the_limit_until_its_window_ends() -> None:
    clock = Clock()
    guard = UnknownKeyGuard(3, clock=clock)
    for _ in range(3):
        assert guard.retry_after("10.0.0.1") is None
        guard.unknown("10.0.0.1")
    assert guard.retry_after("10.0.0.1") == 60.0
    assert guard.retry_after("10.0.0.2") is None  # another address is not affected
    clock.now += 59.5
    assert guard.retry_after("10.0.0.1") == pytest.approx(0.5)
    clock.now += 1
    assert guard.retry_after("10.0.0.1") is None
    guard.unknown("10.0.0.1")  # a new window
    assert guard.retry_after("10.0.0.1") is None


def test_the_address_table_is_bounded_and_sheds_expired_windows() -> None:
    clock = Clock()
    guard = UnknownKeyGuard(3, max_addresses=100, clock=clock)
    for n in range(1000):
        guard.unknown(f"10.0.{n // 256}.{n % 256}")
    assert len(guard) == 100
    clock.now += 61
    guard.unknown("192.0.2.1")
    assert len(guard) == 1  # every expired window went as the new one came


def test_the_client_address_behind_trusted_proxies() -> None:
    guard = UnknownKeyGuard(3, ("127.0.0.1", "10.0.0.0/8"))
    assert guard.address(scope("203.0.113.5", "198.51.100.1")) == "203.0.113.5"  # not a trusted peer
    assert guard.address(scope("127.0.0.1", "198.51.100.1")) == "198.51.100.1"
    assert guard.address(scope("127.0.0.1", "6.6.6.6, 198.51.100.1, 10.1.2.3")) == "198.51.100.1"
    assert guard.address(scope("127.0.0.1", "6.6.6.6", "198.51.100.1")) == "198.51.100.1"  # two headers
    assert guard.address(scope("127.0.0.1", "garbage, 10.0.0.9")) == "127.0.0.1"
    assert guard.address(scope("127.0.0.1")) == "127.0.0.1"
    assert guard.address(scope("127.0.0.1", "2001:db8::1")) == "2001:db8::1"
    assert UnknownKeyGuard(3).address(scope("127.0.0.1", "198.51.100.1")) == "127.0.0.1"  # none trusted


def test_settings() -> None:
    defaults = Settings.from_env({}, env_file=None)
    assert (defaults.unknown_key_limit, defaults.trusted_proxies, defaults.self_service_rotation) == (30, (), True)
    chosen = Settings.from_env(
        {"UNKNOWN_KEY_LIMIT": "0", "TRUSTED_PROXIES": "10.0.0.1, 10.1.0.0/16,::1", "SELF_SERVICE_ROTATION": "False"},
        env_file=None,
    )
    assert chosen.unknown_key_limit == 0 and chosen.self_service_rotation is False
    assert chosen.trusted_proxies == ("10.0.0.1/32", "10.1.0.0/16", "::1/128")
    for name, value in (
        ("UNKNOWN_KEY_LIMIT", "-1"),
        ("UNKNOWN_KEY_LIMIT", "\u00b2"),
        ("UNKNOWN_KEY_LIMIT", "\uff13\uff10"),
        ("UNKNOWN_KEY_LIMIT", "many"),
        ("TRUSTED_PROXIES", "10.0.0.1, proxy.internal"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("SELF_SERVICE_ROTATION", "yes"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value}, env_file=None)


def guess(gw: GatewayProcess, path: str = "/openai/models", **headers: str) -> httpx.Response:
    return httpx.get(f"{gw.url}{path}", headers={"authorization": f"Bearer {keys.new_key()}", **headers})


def flood_lines(gw: GatewayProcess) -> list[dict[str, object]]:
    """The flood warnings, once the first is in the log."""

    def lines() -> list[dict[str, object]]:
        return [line for line in gw.log_lines() if line.get("event") == "unknown_key_flood"]

    wait_until(lines, 5, "an unknown_key_flood line")
    return lines()


def test_a_guessing_address_gets_429_without_a_store_query_and_real_keys_still_work(
    make_gateway: Callable[..., GatewayProcess], pg_dsn: str, pg_proxy: TcpProxy
) -> None:
    gw = make_gateway(
        UNKNOWN_KEY_LIMIT="5", DATABASE_URL=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}")
    )
    key = gw.create_key("team_real")
    real = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{gw.url}/openai/models", headers=real).status_code == 200
    guesses = [guess(gw) for _ in range(5)]
    assert [r.status_code for r in guesses] == [401] * 5
    held = guess(gw)
    assert held.status_code == 429 and 1 <= int(held.headers["retry-after"]) <= 60
    assert held.json()["error"]["type"] == "rate_limit_error" and held.json()["error"]["code"] == "rate_limited"
    anthropic = guess(gw, "/anthropic/v1/messages")
    assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(f"{gw.url}/openai/models", headers=real).status_code == 200  # the neighbour's key works

    lines = flood_lines(gw)
    assert len(lines) == 1 and lines[0]["address"] == "127.0.0.1" and lines[0]["level"] == "warning"
    assert "sk_" not in orjson.dumps(lines[0]).decode()

    pg_proxy.down()  # a store query would now answer 503: the 429 comes without one
    try:
        assert guess(gw).status_code == 429
        assert httpx.get(f"{gw.url}/openai/models", headers=real).status_code == 200  # cached: a dict read
    finally:
        pg_proxy.up()


def test_behind_a_trusted_proxy_the_forwarded_address_is_limited(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(UNKNOWN_KEY_LIMIT="3", TRUSTED_PROXIES="127.0.0.1")
    for _ in range(3):
        assert guess(gw, **{"x-forwarded-for": "203.0.113.7"}).status_code == 401
    assert guess(gw, **{"x-forwarded-for": "203.0.113.7"}).status_code == 429
    assert guess(gw, **{"x-forwarded-for": "6.6.6.6, 203.0.113.7"}).status_code == 429  # the client's own part
    assert guess(gw, **{"x-forwarded-for": "203.0.113.8"}).status_code == 401  # another client
    assert flood_lines(gw)[0]["address"] == "203.0.113.7"


def test_forwarded_addresses_from_untrusted_peers_are_ignored(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(UNKNOWN_KEY_LIMIT="3")
    statuses = [guess(gw, **{"x-forwarded-for": f"203.0.113.{n}"}).status_code for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]


def test_a_limit_of_zero_turns_the_brake_off(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(UNKNOWN_KEY_LIMIT="0")
    assert {guess(gw).status_code for _ in range(40)} == {401}
    # the access line of the last guess is out, and no warning before it: none is coming
    last = guess(gw)
    assert last.status_code == 401
    gw.access_line(last.headers["x-gateway-request-id"])
    assert [line for line in gw.log_lines() if line.get("event") == "unknown_key_flood"] == []


def test_a_revoked_key_retried_is_not_guessing(make_gateway: Callable[..., GatewayProcess]) -> None:
    """Only unknown keys that cost a store query count: a client retrying its revoked key many times,
    then switching to its new key, is not held back."""
    gw = make_gateway(UNKNOWN_KEY_LIMIT="3")
    old, new = gw.create_key("team_retry"), gw.create_key("team_retry")
    assert (
        httpx.delete(f"{gw.url}/tokens/{old}", headers={"authorization": f"Bearer {gw.admin_key}"}).status_code == 204
    )
    retried = {
        httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {old}"}).status_code for _ in range(20)
    }
    assert retried == {401}
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {new}"}).status_code == 200
