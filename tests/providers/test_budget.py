"""A request's worst case before it goes upstream: its output limit read from the body (only when
the body can name one), its prompt estimated from its size, both at the model's prices."""

from __future__ import annotations

import orjson

from providers.budget import BudgetEstimator, output_limit
from providers.metering import Pricer
from providers.prices import load_prices
from providers.usage import Usage
from service.core.request import REST_KEY


def test_the_output_limit_is_the_requests_own() -> None:
    def body(payload: object) -> bytes:
        return orjson.dumps(payload)

    assert output_limit(body({"model": "m", "max_tokens": 7})) == 7
    assert output_limit(body({"max_completion_tokens": 9, "max_tokens": None})) == 9
    assert output_limit(body({"max_output_tokens": 11})) == 11
    assert output_limit(body({"generationConfig": {"maxOutputTokens": 13}})) == 13
    assert output_limit(body({"max_tokens": 10**12})) == 10_000_000
    assert output_limit(body({"max_tokens": True})) is None
    assert output_limit(body({"max_tokens": -1})) is None
    assert output_limit(body({"max_tokens": 0})) is None  # no cap: a budget reserves the default, never nothing
    assert output_limit(body({"max_tokens": 0, "max_completion_tokens": 3})) == 3
    # a limit named only inside a message's text is not the request's
    assert output_limit(body({"messages": [{"content": '{"max_tokens": 5}'}]})) is None
    assert output_limit(b'{"max_tokens": 5') is None  # not JSON
    assert output_limit(b'["max_tokens"]') is None


def test_the_worst_case_is_priced_as_the_metering_prices_a_response() -> None:
    prices = load_prices(None)
    estimate = BudgetEstimator("openai", prices, default_max_tokens=4096)
    scope = {REST_KEY: "v1/chat/completions"}
    for payload in ({"model": "gpt-4o", "max_tokens": 300, "messages": []}, {"model": "gpt-4o-mini", "messages": []}):
        raw = orjson.dumps(payload)
        found = estimate(scope, raw)
        prompt = -(-len(raw) // 4)
        usage = Usage(input_tokens=prompt, output_tokens=int(payload.get("max_tokens", 4096)), found=True)
        assert found == (prompt, Pricer(prices, "openai").cost(str(payload["model"]), usage), payload["model"])
    assert estimate(scope, b'{"model": "no-such-model"}')[1] is None
    assert estimate(scope, b"{}") == (1, None, None)
    assert BudgetEstimator("openai", None, 10)(scope, b'{"model": "gpt-4o"}')[1] is None
