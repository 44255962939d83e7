"""CACHE_SCOPE: teams never share Cloudflare's cached answers unless the operator says so."""

from __future__ import annotations

import httpx

from service.mock_upstream import MockUpstream
from tests.support import GatewayProcess

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "same question"}]}'


def call(gateway: GatewayProcess, key: str, upstream: MockUpstream, **headers: str) -> str | None:
    response = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions", content=BODY, headers={"authorization": f"Bearer {key}", **headers}
    )
    assert response.status_code == 200
    return upstream.last().header("cf-aig-cache-key")


def test_team_scope_keys_the_cache_by_team(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    first, second = gateway.create_key("team_a"), gateway.create_key("team_b")
    other_key_same_team = gateway.create_key("team_a")
    assert call(gateway, first, upstream) is None  # no caching asked for: no key, and no shared cache either
    assert upstream.last().header("cf-aig-skip-cache") == "true"
    legacy = call(gateway, first, upstream, **{"cf-cache-ttl": "300"})  # the older header opts in too
    assert legacy and upstream.last().header("cf-aig-skip-cache") is None

    a = call(gateway, first, upstream, **{"cf-aig-cache-ttl": "300"})
    b = call(gateway, second, upstream, **{"cf-aig-cache-ttl": "300"})
    a_again = call(gateway, other_key_same_team, upstream, **{"cf-aig-cache-ttl": "300"})
    assert a and b and a != b and a == a_again

    client_key = call(gateway, first, upstream, **{"cf-aig-cache-ttl": "300", "cf-aig-cache-key": "my-key"})
    other_team_same_client_key = call(
        gateway, second, upstream, **{"cf-aig-cache-ttl": "300", "cf-aig-cache-key": "my-key"}
    )
    assert client_key not in (None, "my-key", a) and client_key != other_team_same_client_key
    assert upstream.last().header("cf-aig-cache-ttl") == "300"


def test_team_scope_with_a_streamed_body(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    def pieces():
        yield BODY[:20]
        yield BODY[20:]

    response = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions",
        content=pieces(),
        headers={"authorization": f"Bearer {team_key}", "cf-aig-cache-ttl": "60"},
    )
    assert response.status_code == 200
    assert upstream.last().body == BODY
    assert upstream.last().header("cf-aig-cache-key") == call(gateway, team_key, upstream, **{"cf-aig-cache-ttl": "1"})


def test_shared_scope_passes_the_client_headers(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(CACHE_SCOPE="shared")
    key = gw.create_key()
    assert call(gw, key, upstream, **{"cf-aig-cache-ttl": "300"}) is None
    assert call(gw, key, upstream) is None and upstream.last().header("cf-aig-skip-cache") is None
    assert call(gw, key, upstream, **{"cf-aig-cache-ttl": "300", "cf-aig-cache-key": "mine"}) == "mine"
