"""The real OpenAI and Anthropic SDKs, base URL overridden, through a running gateway."""

from __future__ import annotations

import anthropic
import httpx
import openai
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.support import GATEWAY_TOKEN, GatewayProcess


def upstream_call(upstream: MockUpstream, path: str) -> object:
    return next(r for r in reversed(upstream.received) if r.path == path)


@pytest.mark.parametrize("suffix", ["/openai/v1", "/openai"])
def test_openai_sync_plain_and_streaming(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, suffix: str
) -> None:
    client = openai.OpenAI(base_url=gateway.url + suffix, api_key=team_key)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == "/openai/chat/completions"
    assert sent.json()["messages"] == [{"role": "user", "content": "hi"}]

    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the mock upstream"

    models = client.models.list()
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert upstream.last().path == "/openai/models"


async def test_openai_async_plain_and_streaming(gateway: GatewayProcess, team_key: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/openai/v1", api_key=team_key)
    completion = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert completion.model == "gpt-4o"
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    words = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(w or "" for w in words) == "Hello from the mock upstream"
    await client.close()


def test_anthropic_sync_plain_and_streaming(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=team_key)
    message = client.messages.create(model="claude-mock-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == "/anthropic/v1/messages"
    assert sent.header("anthropic-version")
    assert sent.header("x-api-key") is None

    with client.messages.stream(
        model="claude-mock-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "Hello from the mock upstream"


async def test_anthropic_async_streaming(gateway: GatewayProcess, team_key: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=f"{gateway.url}/anthropic", api_key=team_key)
    stream = await client.messages.create(
        model="claude-mock-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    message = await client.messages.create(
        model="claude-mock-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.stop_reason == "end_turn"
    await client.close()


def test_sdks_raise_authentication_error_for_bad_keys(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    before = len(upstream.received)
    bad = "sk_" + "0" * 64
    with pytest.raises(openai.AuthenticationError) as openai_error:
        openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=bad, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert openai_error.value.status_code == 401
    assert openai_error.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="garbage", max_retries=0).messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}]
        )
    assert len(upstream.received) == before  # nothing reached the upstream


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/openai/v1/chat/completions", "openai"),
        ("/anthropic/v1/messages", "anthropic"),
        ("/workers-ai/@cf/meta/llama-3.1-8b-instruct", "cloudflare"),
        ("/workers-ai/v1/chat/completions", "openai"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk_nope"},
        {"x-api-key": "sk_" + "1" * 64},
        {"authorization": "Basic Zm9vOmJhcg=="},
    ],
)
def test_401_is_shaped_like_the_provider(
    gateway: GatewayProcess, upstream: MockUpstream, path: str, shape: str, headers: dict[str, str]
) -> None:
    before = len(upstream.received)
    response = httpx.post(gateway.url + path, json={"model": "m"}, headers=headers)
    assert response.status_code == 401
    body = response.json()
    if shape == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
        assert body["error"]["param"] is None
    elif shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    else:
        assert body["success"] is False and body["result"] is None and body["messages"] == []
        assert body["errors"][0]["code"] == 10000
    assert response.headers["x-gateway-request-id"] in response.text
    assert len(upstream.received) == before


def test_workers_ai_native_and_openai_compatible(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    response = httpx.post(
        f"{gateway.url}/workers-ai/@cf/meta/llama-3.1-8b-instruct",
        json={"prompt": "hi"},
        headers={"authorization": f"Bearer {team_key}"},
    )
    assert response.status_code == 200 and response.json()["success"] is True
    sent = upstream.last()
    assert sent.path == "/workers-ai/@cf/meta/llama-3.1-8b-instruct"
    assert sent.header("authorization") == f"Bearer {GATEWAY_TOKEN}"
    assert sent.header("cf-aig-authorization") == f"Bearer {GATEWAY_TOKEN}"

    client = openai.OpenAI(base_url=f"{gateway.url}/workers-ai/v1", api_key=team_key)
    completion = client.chat.completions.create(
        model="@cf/meta/llama-3.1-8b-instruct", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content
    assert upstream.last().path == "/workers-ai/v1/chat/completions"


def test_what_goes_upstream(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    headers = {
        "authorization": f"Bearer {team_key}",
        "openai-organization": "org-1",
        "cf-aig-cache-ttl": "60",
        "cf-aig-skip-cache": "true",
        "user-agent": "my-agent/1.0",
        "x-request-id": "client-req-42",
        "cf-aig-metadata": '{"user": "u1", "team_id": "evil", "n": 3, "obj": {"x": 1}, "extra": true}',
        "cf-aig-authorization": "Bearer client-supplied",
        "connection": "keep-alive",
    }
    response = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions?api-version=2&x=%2F", json={"model": "m"}, headers=headers
    )
    assert response.status_code == 200
    # the gateway's own id names the request; the client's is recorded beside it, never instead
    own = response.headers["x-gateway-request-id"]
    assert own != "client-req-42" and gateway.access_line(own)["client_request_id"] == "client-req-42"
    assert response.headers["x-request-id"] == "req_upstream_123"
    sent = upstream.last()
    assert sent.query == "api-version=2&x=%2F"
    assert sent.header("authorization") is None
    assert sent.header("cf-aig-authorization") == f"Bearer {GATEWAY_TOKEN}"
    assert sent.header("openai-organization") == "org-1"
    assert sent.header("cf-aig-cache-ttl") == "60" and sent.header("cf-aig-skip-cache") == "true"
    assert sent.header("user-agent") == "my-agent/1.0"
    assert sent.header("host") == f"127.0.0.1:{upstream.port}"
    metadata = orjson.loads(sent.header("cf-aig-metadata") or "")
    assert list(metadata.items()) == [
        ("team_id", "team_123"),
        ("team_name", "Acme Corp"),
        ("request_id", own),
        ("user", "u1"),
        ("n", 3),
    ]
    assert all(team_key not in value for _, value in sent.headers)


@pytest.mark.parametrize("client_metadata", ["not json", "[1,2]", '"text"', "{}", '{"a": null}'])
def test_invalid_client_metadata_is_dropped(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, client_metadata: str
) -> None:
    response = httpx.post(
        f"{gateway.url}/openai/chat/completions",
        json={"model": "m"},
        headers={"authorization": f"Bearer {team_key}", "cf-aig-metadata": client_metadata},
    )
    assert response.status_code == 200
    metadata = orjson.loads(upstream.last().header("cf-aig-metadata") or "")
    assert list(metadata) == ["team_id", "team_name", "request_id"]
    assert metadata["request_id"] == response.headers["x-gateway-request-id"]


def test_provider_key_settings_are_sent_upstream(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(OPENAI_API_KEY="sk-openai-real", ANTHROPIC_API_KEY="sk-ant-real")
    key = gw.create_key()
    httpx.post(f"{gw.url}/openai/v1/chat/completions", json={}, headers={"authorization": f"Bearer {key}"})
    assert upstream.last().header("authorization") == "Bearer sk-openai-real"
    httpx.post(f"{gw.url}/anthropic/v1/messages", json={}, headers={"x-api-key": key})
    assert upstream.last().header("x-api-key") == "sk-ant-real"
    assert "sk-openai-real" not in gw.log_text() and "sk-ant-real" not in gw.log_text()
