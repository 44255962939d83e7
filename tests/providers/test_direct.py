"""Direct mode: no AI_GATEWAY_URL, each provider straight at its own API with the gateway's key."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from service.mock_upstream import MockUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def direct_gateway(make_gateway, direct_upstream: MockUpstream):  # type: ignore[no-untyped-def]
    base = direct_upstream.url
    return make_gateway(
        upstream_url=None,
        OPENAI_API_KEY="sk-openai-direct",
        ANTHROPIC_API_KEY="sk-ant-direct",
        ANTHROPIC_BASE_URL=f"{base}/anthropic-api",
        GROQ_API_KEY="gsk-direct",
        GROQ_BASE_URL=f"{base}/groq-api/openai/v1",
        WORKERS_AI_API_KEY="cf-api-token",
        WORKERS_AI_BASE_URL=f"{base}/client/v4/accounts/acc/ai/run",
        AZURE_OPENAI_API_KEY="az-direct",
        AZURE_OPENAI_BASE_URL=f"{base}/azure-api",
        COMPAT_API_KEY="unused",
        OPENAI_BASE_URL=f"{base}/openai-api/v1",
    )


def test_openai_and_anthropic_direct(direct_gateway, direct_upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    key = direct_gateway.create_key("team_direct", "Direct")
    client = openai.OpenAI(base_url=f"{direct_gateway.url}/openai/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"cf-aig-cache-ttl": "60", "cf-aig-metadata": '{"a": 1}'},
    )
    assert completion.choices[0].message.content == "Hello from the mock upstream"
    sent = direct_upstream.last()
    assert sent.path == "/openai-api/v1/chat/completions"
    assert sent.header("authorization") == "Bearer sk-openai-direct"
    assert not [name for name, _ in sent.headers if name.lower().startswith("cf-aig-")]

    message = anthropic.Anthropic(base_url=f"{direct_gateway.url}/anthropic", api_key=key).messages.create(
        model="claude-mock-1", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "Hello from the mock upstream"
    sent = direct_upstream.last()
    assert sent.path == "/anthropic-api/v1/messages" and sent.header("x-api-key") == "sk-ant-direct"


def test_other_providers_direct(direct_gateway, direct_upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    key = direct_gateway.create_key()
    bearer = {"authorization": f"Bearer {key}"}
    httpx.post(f"{direct_gateway.url}/groq/openai/v1/chat/completions", headers=bearer, json=CHAT)
    assert direct_upstream.last().path == "/groq-api/openai/v1/chat/completions"
    assert direct_upstream.last().header("authorization") == "Bearer gsk-direct"

    httpx.post(f"{direct_gateway.url}/workers-ai/@cf/meta/llama-3.1-8b-instruct", headers=bearer, json={})
    assert direct_upstream.last().path == "/client/v4/accounts/acc/ai/run/@cf/meta/llama-3.1-8b-instruct"
    assert direct_upstream.last().header("authorization") == "Bearer cf-api-token"
    httpx.post(f"{direct_gateway.url}/workers-ai/v1/chat/completions", headers=bearer, json=CHAT)
    assert direct_upstream.last().path == "/client/v4/accounts/acc/ai/v1/chat/completions"

    client = openai.AzureOpenAI(
        azure_endpoint=f"{direct_gateway.url}/azure-openai/res",
        azure_deployment="dep",
        api_key=key,
        api_version="2024-10-21",
        max_retries=0,
    )
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    sent = direct_upstream.last()
    assert sent.path == "/azure-api/openai/deployments/dep/chat/completions" and sent.query == "api-version=2024-10-21"
    assert sent.header("api-key") == "az-direct"


def test_direct_mode_without_a_key_or_gateway_is_503_naming_the_setting(direct_gateway) -> None:  # type: ignore[no-untyped-def]
    key = direct_gateway.create_key()
    bearer = {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{direct_gateway.url}/mistral/v1/chat/completions", headers=bearer, json=CHAT)
    assert response.status_code == 503
    assert "MISTRAL_API_KEY" in response.json()["error"]["message"]
    assert "AI_GATEWAY_URL" in response.json()["error"]["message"]
    response = httpx.post(f"{direct_gateway.url}/compat/chat/completions", headers=bearer, json=CHAT)
    assert response.status_code == 503 and "AI_GATEWAY_URL" in response.json()["error"]["message"]
    response = httpx.post(
        f"{direct_gateway.url}/google-ai-studio/v1/models/g:generateContent", headers={"x-goog-api-key": key}, json={}
    )
    assert response.status_code == 503 and response.json()["error"]["status"] == "UNAVAILABLE"
    assert "GOOGLE_AI_STUDIO_API_KEY" in response.json()["error"]["message"]


def test_workers_ai_direct_needs_an_account(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(upstream_url=None, WORKERS_AI_API_KEY="cf-api-token")
    key = gw.create_key()
    response = httpx.post(f"{gw.url}/workers-ai/@cf/x", headers={"authorization": f"Bearer {key}"}, json={})
    assert response.status_code == 503 and "CF_ACCOUNT_ID" in response.json()["errors"][0]["message"]
    upstreams = next(line for line in gw.log_lines() if line.get("event") == "gateway_starting")["upstreams"]
    assert upstreams["workers-ai"] == "unavailable" and upstreams["openai"] == "unavailable"


def test_public_defaults_in_direct_mode() -> None:
    from config import Settings
    from providers.registry import load_registry
    from providers.upstream import Upstream, resolve

    env = {f"{slug.upper().replace('-', '_')}_API_KEY": "k" for slug in load_registry()}
    settings = Settings.from_env({**env, "CF_ACCOUNT_ID": "acc"}, env_file=None)
    registry = load_registry()
    expected = {
        ("openai", "v1/chat/completions"): "https://api.openai.com/v1/chat/completions",
        ("anthropic", "v1/messages"): "https://api.anthropic.com/v1/messages",
        ("groq", "openai/v1/chat/completions"): "https://api.groq.com/openai/v1/chat/completions",
        ("mistral", "v1/chat/completions"): "https://api.mistral.ai/v1/chat/completions",
        (
            "google-ai-studio",
            "v1beta/models/g:generateContent",
        ): "https://generativelanguage.googleapis.com/v1beta/models/g:generateContent",
        ("deepseek", "v1/chat/completions"): "https://api.deepseek.com/chat/completions",
        ("openrouter", "v1/chat/completions"): "https://openrouter.ai/api/v1/chat/completions",
        ("openrouter", "chat/completions"): "https://openrouter.ai/api/v1/chat/completions",
        ("perplexity-ai", "chat/completions"): "https://api.perplexity.ai/chat/completions",
        ("grok", "v1/chat/completions"): "https://api.x.ai/v1/chat/completions",
        ("cohere", "v2/chat"): "https://api.cohere.com/v2/chat",
        (
            "azure-openai",
            "res/dep/chat/completions",
        ): "https://res.openai.azure.com/openai/deployments/dep/chat/completions",
        ("workers-ai", "@cf/meta/llama"): "https://api.cloudflare.com/client/v4/accounts/acc/ai/run/@cf/meta/llama",
        (
            "workers-ai",
            "v1/chat/completions",
        ): "https://api.cloudflare.com/client/v4/accounts/acc/ai/v1/chat/completions",
    }
    for (slug, rest), url in expected.items():
        upstream = resolve(registry[slug], settings)
        assert isinstance(upstream, Upstream) and not upstream.via_gateway, slug
        assert upstream.url(rest) == url, slug
    assert isinstance(resolve(registry["compat"], settings), str)  # Cloudflare only


@pytest.mark.parametrize("name", ["AI_GATEWAY_TOKEN", "OPENAI_API_KEY"])
def test_a_credential_with_a_line_break_is_refused_at_start_up(name: str) -> None:
    from config import Settings, SettingsError
    from providers.upstream import enabled_upstreams

    env = {"AI_GATEWAY_URL": "https://gateway.example/v1/acc/gw", "AI_GATEWAY_TOKEN": "t", name: "one\nX-Evil: two"}
    with pytest.raises(SettingsError, match=f"{name} holds a control character"):
        enabled_upstreams(Settings.from_env(env, env_file=None))
