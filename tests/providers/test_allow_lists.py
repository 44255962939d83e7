"""Allow-lists on every provider route, through a running gateway with the real SDKs: the model that
goes upstream (body or path) is checked, a refusal is a 403 in the provider's shape naming the model,
and nothing reaches the upstream; keys without lists are untouched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import anthropic
import httpx
import openai
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.support import ADMIN_KEY, GatewayProcess, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
HI = [{"role": "user", "content": "hi"}]


def issue(gateway: GatewayProcess, team_id: str, **fields: object) -> str:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": team_id, **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    key: str = response.json()["apiKey"]
    return key


def count(upstream: MockUpstream) -> int:
    return len(upstream.received)


def refused_upstream_untouched(upstream: MockUpstream, before: int) -> None:
    assert count(upstream) == before, "a refused request reached the upstream"


def test_openai_chat_and_responses(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_openai", allowedModels=["gpt-4o*"])
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HI).choices[0].message.content
    assert upstream.last().json()["model"] == "gpt-4o-mini"
    response = client.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == "Hello from the mock upstream"
    assert upstream.last().path == "/openai/responses"

    before = count(upstream)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="o1", messages=HI)
    assert "'o1'" in refused.value.message and "does not allow" in refused.value.message
    assert refused.value.body["code"] == "not_allowed"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError, match="o1"):
        client.responses.create(model="o1", input="hi")
    plain = openai.OpenAI(base_url=f"{gateway.url}/openai", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="o1"):
        plain.chat.completions.create(model="o1", messages=HI, stream=True)
    refused_upstream_untouched(upstream, before)


def test_azure_deployments(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_azure", allowedModels=["gpt-4o*"])
    client = openai.AzureOpenAI(
        azure_endpoint=f"{gateway.url}/azure-openai/my-resource", api_version="2024-10-21", api_key=key, max_retries=0
    )
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HI).choices
    assert upstream.last().path == "/azure-openai/my-resource/gpt-4o-mini/chat/completions"
    before = count(upstream)
    with pytest.raises(openai.PermissionDeniedError, match="'o1'"):
        client.chat.completions.create(model="o1", messages=HI)
    # the deployment in the path is what goes upstream: an allowed name in the body does not help
    pinned = openai.AzureOpenAI(
        azure_endpoint=f"{gateway.url}/azure-openai/my-resource",
        azure_deployment="o1",
        api_version="2024-10-21",
        api_key=key,
        max_retries=0,
    )
    with pytest.raises(openai.PermissionDeniedError, match="'o1'"):
        pinned.chat.completions.create(model="gpt-4o-mini", messages=HI)
    refused_upstream_untouched(upstream, before)


def test_compat_models_name_their_provider(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_compat", allowedModels=["gpt-4o*"])
    client = openai.OpenAI(base_url=f"{gateway.url}/compat", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="openai/gpt-4o-mini", messages=HI).choices
    assert upstream.last().path == "/compat/chat/completions"
    before = count(upstream)
    with pytest.raises(openai.PermissionDeniedError, match="openai/o1"):
        client.chat.completions.create(model="openai/o1", messages=HI)
    refused_upstream_untouched(upstream, before)

    by_provider = issue(gateway, "team_allow_compat_providers", allowedProviders=["openai"])
    client = openai.OpenAI(base_url=f"{gateway.url}/compat/v1", api_key=by_provider, max_retries=0)
    assert client.chat.completions.create(model="openai/gpt-4o-mini", messages=HI).choices
    with pytest.raises(openai.PermissionDeniedError, match="'anthropic'"):
        client.chat.completions.create(model="anthropic/claude-3-5-haiku", messages=HI)


@pytest.mark.parametrize("method", [":generateContent", ":streamGenerateContent?alt=sse"])
def test_gemini_model_in_the_path(gateway: GatewayProcess, upstream: MockUpstream, method: str) -> None:
    key = issue(gateway, "team_allow_gemini", allowedModels=["gemini-2.0-flash"])
    headers = {"x-goog-api-key": key}
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    base = f"{gateway.url}/google-ai-studio/v1beta/models"
    allowed = httpx.post(f"{base}/gemini-2.0-flash{method}", json=body, headers=headers)
    assert allowed.status_code == 200, allowed.text
    before = count(upstream)
    refused = httpx.post(f"{base}/gemini-1.5-pro{method}", json=body, headers=headers)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["status"] == "PERMISSION_DENIED" and "'gemini-1.5-pro'" in error["message"]
    # percent-encoded as the upstream would decode it: still the refused model
    encoded = httpx.post(f"{base}/gemini-1.5%2Dpro{method}", json=body, headers=headers)
    assert encoded.status_code == 403 and "'gemini-1.5-pro'" in encoded.json()["error"]["message"]
    for odd in ("gemini-2.0-flash%3Ax", "gemini-2.0-flash" + "h" * 200):
        response = httpx.post(f"{base}/{odd}{method}", json=body, headers=headers)
        assert response.status_code == 403 and "could not be determined" in response.json()["error"]["message"]
    refused_upstream_untouched(upstream, before)


def test_workers_ai_by_path(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_workers", allowedModels=["@cf/meta/*"])
    headers = {"authorization": f"Bearer {key}"}
    allowed = httpx.post(
        f"{gateway.url}/workers-ai/@cf/meta/llama-3.1-8b-instruct", json={"prompt": "hi"}, headers=headers
    )
    assert allowed.status_code == 200 and allowed.json()["success"] is True
    before = count(upstream)
    refused = httpx.post(f"{gateway.url}/workers-ai/@cf/mistral/mistral-7b", json={"prompt": "hi"}, headers=headers)
    assert refused.status_code == 403
    body = refused.json()
    assert body["success"] is False and "'@cf/mistral/mistral-7b'" in body["errors"][0]["message"]
    # the OpenAI-compatible endpoint of Workers AI: the body's model
    client = openai.OpenAI(base_url=f"{gateway.url}/workers-ai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="@cf/mistral/mistral-7b"):
        client.chat.completions.create(model="@cf/mistral/mistral-7b", messages=HI)
    refused_upstream_untouched(upstream, before)
    assert client.chat.completions.create(model="@cf/meta/llama-3.1-8b-instruct", messages=HI).choices


def test_allowed_providers(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_providers", allowedProviders=["anthropic"])
    claude = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key, max_retries=0)
    assert claude.messages.create(model="claude-mock-1", max_tokens=8, messages=HI).content
    before = count(upstream)
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="'openai'"):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.list()  # no model needed: the provider alone is refused
    refused_upstream_untouched(upstream, before)


def test_anthropic_model_list(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_claude", allowedModels=["claude-sonnet-4-*"])
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key, max_retries=0)
    assert client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=HI).content
    before = count(upstream)
    with pytest.raises(anthropic.PermissionDeniedError, match="claude-opus-4"):
        client.messages.create(model="claude-opus-4", max_tokens=8, messages=HI)
    refused_upstream_untouched(upstream, before)


def test_team_lists_apply_to_every_key_of_the_team(gateway: GatewayProcess) -> None:
    key = issue(gateway, "team_allow_team")
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="o1", messages=HI).choices  # no list yet
    patched = httpx.patch(f"{gateway.url}/teams/team_allow_team", json={"allowedModels": ["gpt-4o*"]}, headers=ADMIN)
    assert patched.status_code == 200 and patched.json()["allowedModels"] == ["gpt-4o*"]

    def refused() -> bool:
        try:
            client.chat.completions.create(model="o1", messages=HI)
        except openai.PermissionDeniedError as exc:
            return "team" in exc.message
        return False

    wait_until(refused, 2, "the team's list applying to its cached key")
    assert client.chat.completions.create(model="gpt-4o", messages=HI).choices
    # both lists apply: the key's own cannot widen the team's
    both = issue(gateway, "team_allow_team", allowedModels=["o1", "gpt-4o"])
    narrow = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=both, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="team"):
        narrow.chat.completions.create(model="o1", messages=HI)
    assert narrow.chat.completions.create(model="gpt-4o", messages=HI).choices
    cleared = httpx.patch(f"{gateway.url}/teams/team_allow_team", json={"allowedModels": None}, headers=ADMIN)
    assert cleared.json()["allowedModels"] is None
    wait_until(lambda: not refused(), 2, "the team's list removed")


def raw_chat(gateway: GatewayProcess, key: str, body: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return httpx.post(f"{gateway.url}/openai/v1/chat/completions", content=body, headers=headers)


def test_the_model_is_read_as_a_json_parser_reads_it(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_parse", allowedModels=["gpt-4o"])
    # an escaped name is the name it spells, and the body goes up byte for byte
    escaped = b'{"model": "g\\u0070t-4o",  "messages": [{"role": "user", "content": "caf\\u00e9"}]}'
    assert raw_chat(gateway, key, escaped).status_code == 200
    assert upstream.last().body_sha256 == hashlib.sha256(escaped).hexdigest()
    before = count(upstream)
    for body, reason in [
        (b'{"model": "\\u006f1", "messages": []}', "'o1'"),
        (b'{"model": "gpt-4o", "model": "o1", "messages": []}', "twice"),
        (b'{"model": ["gpt-4o"], "messages": []}', "not a string"),
        (b'{"messages": []}', "not a string"),
        (b'["gpt-4o"]', "not a JSON object"),
        (b'{"model": "gpt-4o", "x": NaN}', "not JSON"),
        (b'{"model": "gpt-4o"', "not valid JSON"),
        (b'{"model": "gpt-4o", "x": "\xff"}', "UTF-8"),
        (b"", "could not be determined"),
    ]:
        refused = raw_chat(gateway, key, body)
        assert refused.status_code == 403, body
        assert reason in refused.json()["error"]["message"], (body, refused.text)
    refused_upstream_untouched(upstream, before)


def test_a_model_after_the_first_chunk(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = issue(gateway, "team_allow_big", allowedModels=["gpt-4o"])
    filler = [{"role": "user", "content": "x" * 300_000}]

    def chunks(model: str) -> bytes:
        return orjson.dumps({"messages": filler, "model": model})

    def sent(body: bytes) -> httpx.Response:
        def pieces() -> object:
            for at in range(0, len(body), 16_384):
                yield body[at : at + 16_384]

        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        return httpx.post(f"{gateway.url}/openai/v1/chat/completions", content=pieces(), headers=headers)  # type: ignore[arg-type]

    before = count(upstream)
    assert sent(chunks("o1")).status_code == 403
    refused_upstream_untouched(upstream, before)
    body = chunks("gpt-4o")
    assert sent(body).status_code == 200
    assert upstream.last().body_sha256 == hashlib.sha256(body).hexdigest()


def test_requests_without_a_model_are_refused_only_for_listed_keys(gateway: GatewayProcess, team_key: str) -> None:
    listed = issue(gateway, "team_allow_nomodel", allowedModels=["gpt-4o*"])
    refused = httpx.get(f"{gateway.url}/openai/v1/models", headers={"authorization": f"Bearer {listed}"})
    assert refused.status_code == 403 and "could not be determined" in refused.json()["error"]["message"]
    free = httpx.get(f"{gateway.url}/openai/v1/models", headers={"authorization": f"Bearer {team_key}"})
    assert free.status_code == 200


def test_oversized_body_is_413_for_a_listed_key(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(MAX_REQUEST_BYTES="1000")
    key = issue(gw, "team_allow_size", allowedModels=["gpt-4o"])
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]})

    def pieces() -> object:
        yield body[:500]
        yield body[500:]

    headers = {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{gw.url}/openai/v1/chat/completions", content=pieces(), headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 413
    declared = httpx.post(f"{gw.url}/openai/v1/chat/completions", content=body, headers=headers)
    assert declared.status_code == 413


def test_a_body_read_by_the_allow_list_and_the_limits_goes_up_whole(
    gateway: GatewayProcess, upstream: MockUpstream
) -> None:
    """Both hops read the body of a key with an allow-list and a tokens-per-minute limit (the model,
    the estimate): it is read once, from the client's chunks, and reaches the upstream byte for byte."""
    created = httpx.post(
        f"{gateway.url}/tokens", json={"teamId": "team_allow_tpm", "allowedModels": ["gpt-4o*"]}, headers=ADMIN
    ).json()
    key, kid = created["apiKey"], created["keyId"]
    limits = {"limits": {"tokensPerMinute": 1_000_000_000}}
    assert httpx.patch(f"{gateway.url}/keys/{kid}", json=limits, headers=ADMIN).status_code == 200
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y" * 100_000}]})

    def pieces() -> object:
        for at in range(0, len(body), 16_384):
            yield body[at : at + 16_384]

    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    response = httpx.post(f"{gateway.url}/openai/v1/chat/completions", content=pieces(), headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert upstream.last().body_sha256 == hashlib.sha256(body).hexdigest()
    assert response.headers["x-ratelimit-limit-tokens"] == "1000000000"  # the limits admitted it
