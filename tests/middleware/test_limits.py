"""Limits on the request path of a gateway of one process (limits in its memory), and the team and
key API that sets them; the real SDKs, the mock upstream."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.support import ADMIN_KEY, GatewayProcess, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "Hi"}]
PRICES = '[openai."budget-model"]\ninput = 0\noutput = 1.0\n'


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> GatewayProcess:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    return make_gateway(PRICES_FILE=str(prices))


def patch(gateway: GatewayProcess, path: str, body: object) -> httpx.Response:
    return httpx.patch(f"{gateway.url}{path}", json=body, headers=ADMIN)


def key_id(gateway: GatewayProcess, team_id: str) -> str:
    found: str = httpx.get(f"{gateway.url}/tokens?teamId={team_id}", headers=ADMIN).json()["tokens"][0]["keyId"]
    return found


def test_requests_per_minute_and_concurrency_in_memory(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/readyz").json()["limits"] == "memory"
    assert (
        patch(gateway, "/teams/team_mem", {"limits": {"requestsPerMinute": 3, "maxConcurrent": 1}}).status_code == 200
    )
    key = gateway.create_key("team_mem")
    sdk = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    with httpx.stream(
        "GET", f"{gateway.url}/openai/_mock/hang", headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as hanging:
        chunks = hanging.iter_bytes()
        next(chunks)
        assert hanging.headers["x-ratelimit-remaining-requests"] == "2"
        with pytest.raises(openai.RateLimitError) as busy:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "team 'team_mem' concurrent requests (1)" in busy.value.message
    wait_until(lambda: state(gateway, "/teams/team_mem")["inFlight"] == 0, 5, "the stream's lease released")
    for _ in range(2):  # with the stream, 3 requests this minute
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "requests per minute (3)" in refused.value.message
    claude = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as also:
        claude.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES)
    assert also.value.response.headers["x-ratelimit-limit-requests"] == "3"
    sdk.close()
    claude.close()


def test_the_upstreams_rate_headers_of_a_limited_kind_give_way_to_the_gateways(gateway: GatewayProcess) -> None:
    """The upstream's 429 says 10,000 requests and 30,000 tokens a minute (its own limits, on the
    gateway's shared account); the team's requests limit answers instead, its tokens limit does not
    exist, so the upstream's tokens headers pass."""
    patch(gateway, "/teams/team_headers", {"limits": {"requestsPerMinute": 50}})
    key = gateway.create_key("team_headers")
    answer = httpx.get(f"{gateway.url}/openai/_mock/status/429", headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 429
    assert answer.headers.get_list("x-ratelimit-limit-requests") == ["50"]
    assert answer.headers.get_list("x-ratelimit-remaining-requests") == ["49"]
    assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
    assert answer.headers.get_list("x-ratelimit-limit-tokens") == ["30000"]
    unlimited = gateway.create_key("team_without_limits")
    plain = httpx.get(f"{gateway.url}/openai/_mock/status/429", headers={"authorization": f"Bearer {unlimited}"})
    assert plain.headers.get_list("x-ratelimit-limit-requests") == ["10000"]  # a team without limits: untouched


def state(gateway: GatewayProcess, path: str) -> dict[str, object]:
    found: dict[str, object] = httpx.get(f"{gateway.url}{path}", headers=ADMIN).json()["state"]
    return found


def test_key_limits_and_budgets(gateway: GatewayProcess) -> None:
    key = gateway.create_key("team_keyed")
    kid = key_id(gateway, "team_keyed")
    patched = patch(gateway, f"/keys/{kid}", {"limits": {"budgetUsd": 0.000012, "budgetPeriod": "week"}})
    assert patched.status_code == 200
    assert patched.json()["limits"]["budgetUsd"] == 0.000012
    sdk = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    for _ in range(2):
        sdk.chat.completions.create(model="budget-model", max_tokens=6, messages=MESSAGES)
    wait_until(lambda: state(gateway, f"/keys/{kid}")["spentUsd"] == 0.000012, 5, "both costs settled")
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="budget-model", max_tokens=1, messages=MESSAGES)
    assert f"key '{kid}' budget ($0.000012 per week" in refused.value.message
    assert int(refused.value.response.headers["retry-after"]) > 1  # until next Monday
    shown = state(gateway, f"/keys/{kid}")
    assert shown["remainingUsd"] == 0.0 and str(shown["resetsAt"]).endswith("T00:00:00.000Z")
    # a null clears a limit: the key is free again
    assert patch(gateway, f"/keys/{kid}", {"limits": {"budgetUsd": None}}).json()["limits"]["budgetUsd"] is None
    assert sdk.chat.completions.create(model="budget-model", messages=MESSAGES).choices  # at once, in this process
    sdk.close()


def test_unpriced_models_under_a_budget(make_gateway: Callable[..., GatewayProcess]) -> None:
    denying = make_gateway()
    patch(denying, "/teams/team_unpriced", {"limits": {"budgetUsd": 10}})
    key = denying.create_key("team_unpriced")
    sdk = openai.OpenAI(base_url=f"{denying.url}/openai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "The model 'no-such-model' has no price" in refused.value.message
    assert "team 'team_unpriced' has a budget" in refused.value.message
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # priced: admitted
    assert sdk.models.list().data  # names no model and generates nothing: admitted at no cost
    with pytest.raises(openai.PermissionDeniedError) as unnamed:  # writes, names no model: cannot be priced
        sdk.post("/chat/completions", body={"messages": MESSAGES}, cast_to=object)
    assert "The request names no model, so it has no price" in unnamed.value.message
    sdk.close()
    denying.stop()  # one gateway process at a time on the SQLite file: the second would keep no limits
    allowing = make_gateway(BUDGET_UNPRICED="allow")
    patch(allowing, "/teams/team_unpriced", {"limits": {"budgetUsd": 10}})
    other = openai.OpenAI(base_url=f"{allowing.url}/openai/v1", api_key=allowing.create_key("team_unpriced"))
    assert other.chat.completions.create(model="no-such-model", messages=MESSAGES).choices
    other.close()


def test_no_limits_no_headers_and_large_bodies(
    gateway: GatewayProcess, make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    key = gateway.create_key("team_free")
    plain = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"authorization": f"Bearer {key}"},
    )
    assert plain.status_code == 200 and not any(name.startswith("x-ratelimit") for name in plain.headers)
    # a database of its own: a second gateway process on one SQLite file keeps no limits
    small = make_gateway(MAX_REQUEST_BYTES="1000", DATABASE_URL=f"sqlite:///{tmp_path / 'small.db'}")
    patch(small, "/teams/team_small", {"limits": {"tokensPerMinute": 1000}})
    small_key = small.create_key("team_small")
    too_large = httpx.post(
        f"{small.url}/openai/v1/chat/completions",
        content=iter([b'{"model": "gpt-4o-mini", "x": "', b"a" * 2000, b'"}']),  # chunked, no length declared
        headers={"authorization": f"Bearer {small_key}"},
    )
    assert too_large.status_code == 413
    counted = httpx.post(
        f"{small.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": MESSAGES},
        headers={"authorization": f"Bearer {small_key}"},
    )
    assert counted.status_code == 200 and counted.headers["x-ratelimit-limit-tokens"] == "1000"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"limits": {"requestsPerMinute": 0}}, "limits.requestsPerMinute"),
        ({"limits": {"tokensPerMinute": True}}, "limits.tokensPerMinute"),
        ({"limits": {"maxConcurrent": 1.5}}, "limits.maxConcurrent"),
        ({"limits": {"budgetUsd": -1}}, "limits.budgetUsd"),
        ({"limits": {"budgetUsd": 0.0000001}}, "limits.budgetUsd"),
        ({"limits": {"budgetUsd": "5"}}, "limits.budgetUsd"),
        ({"limits": {"budgetUsd": 1e300}}, "limits.budgetUsd"),
        ({"limits": {"budgetPeriod": "year"}}, "limits.budgetPeriod"),
        ({"limits": {"rpm": 5}}, "limits.rpm"),
        ({"limits": []}, "'limits'"),
        ({"limitz": {}}, "'limitz'"),
    ],
)
def test_patch_bodies_are_checked(gateway: GatewayProcess, body: object, named: str) -> None:
    response = patch(gateway, "/teams/team_checked", body)
    assert response.status_code == 400
    assert named in response.json()["error"]
    assert httpx.get(f"{gateway.url}/teams/team_checked", headers=ADMIN).status_code == 404  # nothing written


def test_teams_listing_paging_and_partial_updates(gateway: GatewayProcess) -> None:
    for team in ("team_b", "team_a", "team_c", "team_a"):
        gateway.create_key(team, name=team.upper())
    first = httpx.get(f"{gateway.url}/teams?limit=2", headers=ADMIN).json()
    assert [t["teamId"] for t in first["teams"]] == ["team_a", "team_b"]
    assert first["teams"][0]["keyCount"] == 2 and first["teams"][0]["name"] == "TEAM_A"
    rest = httpx.get(f"{gateway.url}/teams?limit=2&cursor={first['nextCursor']}", headers=ADMIN).json()
    assert [t["teamId"] for t in rest["teams"]] == ["team_c"] and rest["nextCursor"] is None
    assert httpx.get(f"{gateway.url}/teams?cursor=%%%", headers=ADMIN).status_code == 400
    patch(gateway, "/teams/team_a", {"limits": {"requestsPerMinute": 10, "maxConcurrent": 2}})
    after = patch(gateway, "/teams/team_a", {"limits": {"maxConcurrent": None, "tokensPerMinute": 500}}).json()
    assert after["limits"] == {
        "requestsPerMinute": 10,
        "tokensPerMinute": 500,
        "maxConcurrent": None,
        "budgetUsd": None,
        "budgetPeriod": None,
    }
    assert after["state"]["spentUsd"] is None and after["state"]["inFlight"] == 0
    # limits may be set before the team has any key; the listing shows teams with keys
    early = patch(gateway, "/teams/team_later", {"limits": {"budgetUsd": 3, "budgetPeriod": "total"}}).json()
    assert early["keyCount"] == 0 and early["state"]["periodStart"] is None and early["state"]["resetsAt"] is None
    listed = httpx.get(f"{gateway.url}/teams", headers=ADMIN).json()["teams"]
    assert "team_later" not in [t["teamId"] for t in listed]
    assert patch(gateway, "/keys/key_0000000000000000", {"limits": {}}).status_code == 404
