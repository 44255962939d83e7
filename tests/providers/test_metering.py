"""Usage and cost read on the side of real responses, through the real SDKs: the client gets the same
bytes as without metering, the access line the tokens and the exact cost."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import httpx
import openai

from providers.prices import load_prices
from service.mock_upstream import MOCK_STREAM_USAGE, MockUpstream, _openai_events
from tests.support import GatewayProcess

PRICES = load_prices()


def cost_usd(provider: str, model: str, input_tokens: int, output_tokens: int) -> float:
    micro = PRICES.cost_micro_usd(provider, model, input_tokens, output_tokens)
    assert micro is not None
    return micro / 1_000_000


def test_a_plain_completion_is_metered_and_priced(gateway: GatewayProcess, team_key: str) -> None:
    client = openai.OpenAI(api_key=team_key, base_url=f"{gateway.url}/openai/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.usage is not None
    line = gateway.access_line(raw.headers["x-gateway-request-id"])
    assert line["model"] == "gpt-4o-mini"
    assert (line["input_tokens"], line["output_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert line["cost_usd"] == cost_usd("openai", "gpt-4o-mini", 5, 6)


def test_a_stream_whose_client_did_not_ask_for_usage_is_metered_and_unchanged(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {team_key}"}
    )
    assert upstream.last().json()["stream_options"] == {"include_usage": True}  # the gateway asked
    sent = _openai_events(include_usage=True)
    assert response.content == b"".join(event for event in sent if b'"choices":[]' not in event)
    line = gateway.access_line(response.headers["x-gateway-request-id"])
    assert (line["input_tokens"], line["output_tokens"]) == (
        MOCK_STREAM_USAGE["prompt_tokens"],
        MOCK_STREAM_USAGE["completion_tokens"],
    )
    client = openai.OpenAI(api_key=team_key, base_url=f"{gateway.url}/openai/v1", max_retries=0)
    chunks = list(client.chat.completions.create(**body))  # type: ignore[call-overload]
    assert chunks and all(chunk.choices and chunk.usage is None for chunk in chunks)


def test_workers_ai_openai_streams_are_asked_for_usage_too(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(api_key=team_key, base_url=f"{gateway.url}/workers-ai/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="@cf/meta/llama-3.1-8b-instruct", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(raw.parse())
    assert chunks and all(chunk.choices and chunk.usage is None for chunk in chunks)  # no extra chunk
    assert upstream.last().json()["stream_options"] == {"include_usage": True}
    line = gateway.access_line(raw.headers["x-gateway-request-id"])
    assert (line["input_tokens"], line["output_tokens"]) == (
        MOCK_STREAM_USAGE["prompt_tokens"],
        MOCK_STREAM_USAGE["completion_tokens"],
    )


def test_a_stream_whose_client_asked_for_usage_gets_it_as_sent(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(api_key=team_key, base_url=f"{gateway.url}/openai/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == MOCK_STREAM_USAGE["prompt_tokens"]
    assert upstream.last().json()["stream_options"] == {"include_usage": True}
    line = gateway.access_line(raw.headers["x-gateway-request-id"])
    assert line["output_tokens"] == MOCK_STREAM_USAGE["completion_tokens"]
    assert line["cost_usd"] == cost_usd("openai", "gpt-4o-mini", 9, 5)


def test_anthropic_streams_count_output_once(gateway: GatewayProcess, team_key: str) -> None:
    client = anthropic.Anthropic(api_key=team_key, base_url=f"{gateway.url}/anthropic", max_retries=0)
    with client.messages.with_streaming_response.create(
        model="claude-mock-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        request_id = response.headers["x-gateway-request-id"]
        for _ in response.iter_lines():
            pass
    line = gateway.access_line(request_id)
    # message_start says 5 in, 1 out; the last message_delta's cumulative 6 out wins, never 1 + 6
    assert (line["input_tokens"], line["output_tokens"]) == (5, 6)
    assert line["cost_usd"] is None  # claude-mock-1 has no price: null, never 0


def test_injection_off_leaves_streams_untouched_and_unmetered(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    gw = make_gateway(USAGE_STREAM_OPTIONS="off")
    key = gw.create_key()
    body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
    response = httpx.post(f"{gw.url}/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert "stream_options" not in upstream.last().json()
    assert response.content == b"".join(_openai_events())
    line = gw.access_line(response.headers["x-gateway-request-id"])
    assert line["input_tokens"] is None and line["model"] == "gpt-4o-mini"  # the model the request named


def test_metering_off_records_nothing(make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream) -> None:
    gw = make_gateway(USAGE_METERING="false")
    key = gw.create_key()
    response = httpx.post(
        f"{gw.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "stream": True, "messages": []},
        headers={"authorization": f"Bearer {key}"},
    )
    assert "stream_options" not in upstream.last().json()
    line = gw.access_line(response.headers["x-gateway-request-id"])
    assert line["input_tokens"] is None and line["cost_usd"] is None


def test_tokens_cost_and_unpriced_requests_in_metrics(
    make_gateway: Callable[..., GatewayProcess], upstream: MockUpstream
) -> None:
    from tests.support import ADMIN_KEY, wait_until

    gw = make_gateway(METRICS_TEAM_LABELS="true")
    key = gw.create_key("team_metered")
    auth = {"authorization": f"Bearer {key}"}
    httpx.post(f"{gw.url}/openai/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}, headers=auth)
    httpx.post(f"{gw.url}/openai/v1/chat/completions", json={"model": "mystery-model", "messages": []}, headers=auth)
    failed = httpx.post(f"{gw.url}/openai/_mock/status/500", json={"model": "mystery-model"}, headers=auth)
    assert failed.status_code == 500  # an upstream error: no usage read, so not an unpriced request either

    def scrape() -> str:
        return httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text

    wait_until(lambda: "gateway_unpriced_requests_total" in scrape() and "mystery-model" in scrape(), 5)
    text = scrape()
    assert 'gateway_tokens_total{kind="input",model="gpt-4o-mini",provider="openai",team="team_metered"} 5.0' in text
    assert 'gateway_tokens_total{kind="output",model="gpt-4o-mini",provider="openai",team="team_metered"} 6.0' in text
    expected = cost_usd("openai", "gpt-4o-mini", 5, 6)
    assert f'gateway_cost_usd_total{{model="gpt-4o-mini",provider="openai",team="team_metered"}} {expected}' in text
    assert 'gateway_unpriced_requests_total{model="mystery-model",provider="openai",team="team_metered"} 1.0' in text
    assert sum(1 for line in gw.log_lines() if line.get("event") == "model_unpriced") == 1
    assert "\ngateway_usage_rows_dropped_total 0.0\n" in text  # shown before any drop: an alert can watch it


def test_the_usage_chunk_hider_holds_back_a_bounded_amount() -> None:
    from providers.stream_options import MAX_PENDING, UsageChunkHider

    hide = UsageChunkHider()
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    assert hide(b'data: {"a":1}\n\ndata: {"choi', False) == b'data: {"a":1}\n\n'  # the partial event waits
    assert hide(b'ces":[{}]}\n\n' + usage[:10], False) == b'data: {"choices":[{}]}\n\n'
    assert hide(usage[10:] + b"data: [DONE]\n\n", True) == b"data: [DONE]\n\n"  # the usage-only event is gone
    huge = b"data: " + b"x" * (MAX_PENDING + 10)
    assert hide(huge, False) == huge  # no end in sight: not held, however long


def test_the_usage_chunk_hider_keeps_other_chunks_without_choices() -> None:
    """Only the usage chunk the gateway caused goes: Azure's first chunk (no choices, its prompt
    filter results, ``"usage": null`` once usage is asked for) and any other stay."""
    from providers.stream_options import UsageChunkHider

    filters = b'data: {"choices":[],"created":0,"id":"","model":"","prompt_filter_results":[{}],"usage":null}\n\n'
    content = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\r\n\r\n'
    hide = UsageChunkHider()
    assert hide(filters + content, False) == filters + content
    assert hide(usage + b"data: [DONE]\n\n", True) == b"data: [DONE]\n\n"
