"""Every shipped provider, through the client its users have, against the mock Cloudflare gateway."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.support import BIN, GATEWAY_TOKEN, GatewayProcess, gateway_env

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("base", "upstream_path"),
    [
        ("/openai/v1", "/openai/chat/completions"),
        ("/openai", "/openai/chat/completions"),
        ("/groq/v1", "/groq/chat/completions"),
        ("/groq/openai/v1", "/groq/chat/completions"),  # the Groq SDK's own base path
        ("/mistral/v1", "/mistral/v1/chat/completions"),
        ("/deepseek", "/deepseek/chat/completions"),
        ("/deepseek/v1", "/deepseek/chat/completions"),
        ("/openrouter/v1", "/openrouter/chat/completions"),
        ("/openrouter", "/openrouter/chat/completions"),
        ("/perplexity-ai", "/perplexity-ai/chat/completions"),
        ("/grok/v1", "/grok/v1/chat/completions"),
        ("/workers-ai/v1", "/workers-ai/v1/chat/completions"),
        ("/compat", "/compat/chat/completions"),
        ("/compat/v1", "/compat/chat/completions"),
    ],
)
def test_openai_compatible_providers_through_the_openai_sdk(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, base: str, upstream_path: str
) -> None:
    client = openai.OpenAI(base_url=gateway.url + base, api_key=team_key, max_retries=0)
    model = "groq/llama-3.3-70b-versatile" if base.startswith("/compat") else "some-model"
    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == upstream_path
    assert sent.json()["model"] == model
    assert sent.header("cf-aig-authorization") == f"Bearer {GATEWAY_TOKEN}"
    # the team key never goes up; Workers AI takes the gateway token as its credential
    expected = f"Bearer {GATEWAY_TOKEN}" if base.startswith("/workers-ai") else None
    assert sent.header("authorization") == expected
    assert orjson.loads(sent.header("cf-aig-metadata") or "")["team_id"] == "team_123"

    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the mock upstream"


def test_google_ai_studio_with_its_own_key_header(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    path = "/google-ai-studio/v1beta/models/gemini-2.0-flash:generateContent"
    response = httpx.post(
        gateway.url + path, headers={"x-goog-api-key": team_key}, json={"contents": [{"parts": [{"text": "hi"}]}]}
    )
    assert response.status_code == 200
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"] == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == path
    assert sent.header("x-goog-api-key") is None  # the team key is stripped

    refused = httpx.post(gateway.url + path, headers={"x-goog-api-key": "sk_" + "0" * 64}, json={})
    assert refused.status_code == 401
    assert refused.json()["error"]["status"] == "UNAUTHENTICATED" and refused.json()["error"]["code"] == 401


def test_cohere(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    response = httpx.post(
        f"{gateway.url}/cohere/v2/chat",
        headers={"authorization": f"Bearer {team_key}"},
        json={"model": "command-r", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200 and response.json()["finish_reason"] == "COMPLETE"
    assert upstream.last().path == "/cohere/v2/chat"
    refused = httpx.post(f"{gateway.url}/cohere/v2/chat", json={})
    assert refused.status_code == 401 and set(refused.json()) == {"message"}


@pytest.mark.parametrize("style", ["base_url", "azure_endpoint"])
def test_azure_openai_through_the_azure_client(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, style: str
) -> None:
    if style == "base_url":
        client = openai.AzureOpenAI(
            base_url=f"{gateway.url}/azure-openai/my-resource/my-deployment",
            api_key=team_key,
            api_version="2024-10-21",
            max_retries=0,
        )
    else:
        client = openai.AzureOpenAI(
            azure_endpoint=f"{gateway.url}/azure-openai/my-resource",
            azure_deployment="my-deployment",
            api_key=team_key,
            api_version="2024-10-21",
            max_retries=0,
        )
    completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == "/azure-openai/my-resource/my-deployment/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.header("api-key") is None


def test_bad_azure_path_is_400(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.post(f"{gateway.url}/azure-openai/only-resource", headers={"api-key": team_key}, json={})
    assert response.status_code == 400


def test_provider_keys_follow_the_slug_rule(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(
        GOOGLE_AI_STUDIO_API_KEY="goog-real",
        GROQ_API_KEY="groq-real",
        AZURE_OPENAI_API_KEY="az-real",
        WORKERS_AI_API_KEY="cf-real",
    )
    key = gw.create_key()
    httpx.post(f"{gw.url}/google-ai-studio/v1/models/g:generateContent", headers={"x-goog-api-key": key}, json={})
    assert upstream.last().header("x-goog-api-key") == "goog-real"
    httpx.post(f"{gw.url}/groq/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=CHAT)
    assert upstream.last().header("authorization") == "Bearer groq-real"
    httpx.post(f"{gw.url}/azure-openai/r/d/chat/completions?api-version=1", headers={"api-key": key}, json=CHAT)
    assert upstream.last().header("api-key") == "az-real"
    httpx.post(f"{gw.url}/workers-ai/@cf/meta/llama", headers={"authorization": f"Bearer {key}"}, json={})
    assert upstream.last().header("authorization") == "Bearer cf-real"
    log = gw.log_text()
    assert all(secret not in log for secret in ("goog-real", "groq-real", "az-real", "cf-real"))


def test_providers_setting_mounts_only_the_named_ones(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(PROVIDERS="openai, groq")
    key = gw.create_key()
    assert (
        httpx.post(
            f"{gw.url}/groq/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=CHAT
        ).status_code
        == 200
    )
    refused = httpx.post(f"{gw.url}/anthropic/v1/messages", headers={"x-api-key": key}, json={})
    assert refused.status_code == 404
    assert "openai, groq" in refused.json()["error"]
    assert httpx.get(f"{gw.url}/not-a-provider/x").status_code == 404


def test_unknown_provider_in_providers_stops_start_up(tmp_path: Path, upstream: MockUpstream) -> None:
    env = gateway_env(upstream.url, tmp_path, PROVIDERS="openai,nope")
    result = subprocess.run([str(BIN / "python"), "-m", "config"], env=env, capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stderr.strip().startswith("configuration error: PROVIDERS names unknown providers: nope")


def test_malformed_provider_base_url_stops_start_up(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path, GROQ_BASE_URL="ftp://nowhere")
    result = subprocess.run([str(BIN / "python"), "-m", "config"], env=env, capture_output=True, text=True)
    assert result.returncode == 3 and "GROQ_BASE_URL" in result.stderr and "Traceback" not in result.stderr
