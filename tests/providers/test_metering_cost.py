"""The cost of a response's usage: the integer rates the request path uses give exactly what the
price table's own Decimal arithmetic gives, for every priced model and any counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from providers.metering import Pricer, path_model, request_model
from providers.prices import load_prices
from providers.usage import Usage

PRICES = load_prices()
MODELS = sorted((slug, model) for slug, table in PRICES.providers.items() for model in table.models)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    fresh=st.integers(0, 2_000_000),
    output=st.integers(0, 200_000),
    cache_read=st.integers(0, 500_000),
    cache_write=st.integers(0, 500_000),
    reasoning=st.integers(0, 100_000),
)
def test_integer_rates_equal_the_tables_arithmetic(
    model: tuple[str, str], fresh: int, output: int, cache_read: int, cache_write: int, reasoning: int
) -> None:
    provider, name = model
    price = PRICES.price(provider, name)
    assert price is not None
    # Usage counts cache inside input and reasoning inside output, for every provider
    usage = Usage(fresh + cache_read + cache_write, output + reasoning, cache_read, cache_write, reasoning, name, True)
    expected = price.cost_micro_usd(
        fresh + cache_read + cache_write if price.input_includes_cache else fresh,
        output + reasoning if price.output_includes_reasoning else output,
        cache_read,
        cache_write,
        reasoning,
    )
    assert Pricer(PRICES, provider).cost(name, usage) == expected


def test_unpriced_and_unknown_usage_cost_nothing_known() -> None:
    assert Pricer(PRICES, "openai").cost("no-such-model", Usage(10, 10, found=True)) is None
    assert Pricer(PRICES, "openai").cost(None, Usage(10, 10, found=True)) is None
    assert Pricer(PRICES, "openai").cost("gpt-4o-mini", Usage(found=False)) is None
    assert Pricer(PRICES, "openai").cost("gpt-4o-mini", Usage(5, 6, reasoning_tokens=9, found=True)) is None


def test_the_model_a_request_names() -> None:
    assert path_model("google-ai-studio", "v1beta/models/gemini-2.5-flash:streamGenerateContent") == "gemini-2.5-flash"
    assert path_model("workers-ai", "@cf/meta/llama-3.1-8b-instruct?x=1") == "@cf/meta/llama-3.1-8b-instruct"
    assert path_model("azure-openai", "res/openai/deployments/my-gpt/chat/completions") == "my-gpt"
    assert path_model("openai", "v1/chat/completions") is None
    assert request_model("openai", "v1/chat/completions", b'{"messages": [], "model" : "gpt-4o"}') == "gpt-4o"
    assert request_model("openai", "v1/chat/completions", b"not json") is None
