"""The price table and the cost of a request: every shipped entry, the lookup rule, PRICES_FILE, and
exact micro-dollar arithmetic checked against hand-computed sums."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from config import Settings, SettingsError
from providers.prices import PRICE_KEYS, PRICES, Price, PriceTable, ProviderPrices, load_prices

CATALOG_SLUGS = {
    "openai",
    "anthropic",
    "groq",
    "mistral",
    "google-ai-studio",
    "deepseek",
    "openrouter",
    "perplexity-ai",
    "grok",
    "cohere",
    "compat",
    "workers-ai",
    "azure-openai",
}


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_prices()


def test_every_shipped_entry_loads_and_is_non_negative(table: PriceTable) -> None:
    raw = tomllib.loads(PRICES.read_text(), parse_float=Decimal)
    assert table.checked == raw["checked"] == "2026-11-30"
    assert set(table.providers) == CATALOG_SLUGS
    count = 0
    for slug, provider in table.providers.items():
        for name, price in provider.models.items():
            count += 1
            for key in PRICE_KEYS:
                value = getattr(price, key)
                assert value is None or (isinstance(value, Decimal) and value >= 0), (slug, name, key)
            assert price == table.price(slug, name)
            assert price.input_includes_cache == provider.input_includes_cache
            # the loader's values are exactly the file's
            assert price.input == Decimal(str(raw[slug][name]["input"]))
    assert count > 60


def test_conventions_per_provider(table: PriceTable) -> None:
    conventions = {slug: (p.input_includes_cache, p.output_includes_reasoning) for slug, p in table.providers.items()}
    assert conventions["openai"] == (True, True)
    assert conventions["anthropic"] == (False, True)
    assert conventions["google-ai-studio"] == (True, False)
    assert conventions["grok"] == (True, False)


@pytest.mark.parametrize(
    ("provider", "model", "family"),
    [
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4.1-2025-04-14", "gpt-4.1"),
        ("anthropic", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("anthropic", "claude-opus-4-5@20251101", "claude-opus-4-5"),
        ("mistral", "mistral-medium-latest", "mistral-medium"),
    ],
)
def test_snapshots_map_to_their_family(table: PriceTable, provider: str, model: str, family: str) -> None:
    assert table.price(provider, model) == table.providers[provider].models[family]


def test_gpt_4o_mini_is_never_priced_as_gpt_4o(table: PriceTable) -> None:
    gpt_4o = table.price("openai", "gpt-4o")
    mini = table.price("openai", "gpt-4o-mini-2024-07-18")
    assert gpt_4o is not None and mini is not None and mini != gpt_4o
    # without a gpt-4o-mini entry, neither name nor snapshot falls back to gpt-4o
    models = {k: v for k, v in table.providers["openai"].models.items() if k != "gpt-4o-mini"}
    pruned = PriceTable({"openai": replace(table.providers["openai"], models=models)})
    assert pruned.price("openai", "gpt-4o-mini") is None
    assert pruned.price("openai", "gpt-4o-mini-2024-07-18") is None
    assert pruned.price("openai", "gpt-4o-2024-08-06") == gpt_4o


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-", "gpt-4", "gpt-4o-audio-preview", "gpt-4o-0125", "claude-sonnet", "gpt-4o-2024-08", "-latest"],
)
def test_no_prefix_or_partial_match(table: PriceTable, model: str) -> None:
    assert table.price("openai", model) is None
    assert table.price("anthropic", model) is None


def test_unknown_model_and_provider_are_none(table: PriceTable) -> None:
    assert table.price("openai", "gpt-9") is None
    assert table.price("nobody", "gpt-4o") is None
    assert table.cost_micro_usd("openai", "gpt-9", 1000, 1000) is None
    assert table.price("compat", "gpt-4o") is None  # no provider part
    assert table.price("compat", "nobody/gpt-4o") is None
    assert table.price("compat", "openai/") is None


def test_compat_and_openrouter_use_the_provider_table(table: PriceTable) -> None:
    sonnet = table.price("anthropic", "claude-sonnet-4-5")
    via_compat = table.price("compat", "anthropic/claude-sonnet-4-5-20250929")
    assert sonnet is not None and via_compat is not None
    assert (via_compat.input, via_compat.output, via_compat.cache_read, via_compat.cache_write) == (
        sonnet.input,
        sonnet.output,
        sonnet.cache_read,
        sonnet.cache_write,
    )
    # the answer is in the OpenAI shape: prompt_tokens includes the cached tokens
    assert not sonnet.input_includes_cache and via_compat.input_includes_cache
    assert table.price("compat", "openai/gpt-4o") == table.price("openai", "gpt-4o")
    workers = table.price("compat", "workers-ai/@cf/meta/llama-3.1-8b-instruct")
    assert workers == table.price("workers-ai", "@cf/meta/llama-3.1-8b-instruct")
    assert table.price("compat", "groq/openai/gpt-oss-120b") == table.price("groq", "openai/gpt-oss-120b")
    flash = table.price("openrouter", "google/gemini-2.5-flash")
    gemini = table.price("google-ai-studio", "gemini-2.5-flash")
    assert flash is not None and gemini is not None and flash.input == gemini.input
    assert flash.output_includes_reasoning and not gemini.output_includes_reasoning
    assert table.price("openrouter", "openai/gpt-4o-mini") == table.price("openai", "gpt-4o-mini")
    assert table.price("openai", "openai/gpt-4o") is None  # the rule is only the routers'


def test_azure_openai_prices_the_reported_model_through_openai(table: PriceTable) -> None:
    assert table.price("azure-openai", "gpt-4o-2024-08-06") == table.price("openai", "gpt-4o")
    assert table.price("azure-openai", "my-deployment") is None


def test_prices_file_overrides_and_adds(tmp_path: Path) -> None:
    extra = tmp_path / "prices.toml"
    extra.write_text(
        """
checked = "2026-12-01"

[openai."gpt-4o"]
input = 1
output = 2

[azure-openai."gpt-4o"]
input = 2.75
output = 11

[anthropic]
input_includes_cache = true

[together]
output_includes_reasoning = false

[together."meta-llama/Llama-3.3-70B-Instruct-Turbo"]
input = 0.88
output = 0.88
"""
    )
    table = load_prices(extra)
    assert table.checked == "2026-12-01"
    assert table.price("openai", "gpt-4o") == Price(Decimal(1), Decimal(2))
    assert table.price("openai", "gpt-4o-2024-08-06") == Price(Decimal(1), Decimal(2))
    assert table.price("openai", "gpt-4o-mini") == load_prices().price("openai", "gpt-4o-mini")
    assert table.price("azure-openai", "gpt-4o") == Price(Decimal("2.75"), Decimal(11))
    assert table.price("azure-openai", "gpt-4.1") == table.price("openai", "gpt-4.1")
    haiku = table.price("anthropic", "claude-haiku-4-5")
    assert haiku is not None and haiku.input_includes_cache and haiku.cache_write == Decimal("1.25")
    llama = table.price("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo")
    assert llama == Price(Decimal("0.88"), Decimal("0.88"), output_includes_reasoning=False)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[openai\n", "cannot be read as TOML"),
        ('[openai."gpt-4o"]\ninput = -1\noutput = 2\n', "[openai.gpt-4o] input must be a number"),
        ('[openai."gpt-4o"]\ninput = "2.50"\noutput = 2\n', "input must be a number"),
        ('[openai."gpt-4o"]\ninput = true\noutput = 2\n', "input must be a number"),
        ('[openai."gpt-4o"]\ninput = nan\noutput = 2\n', "input must be a number"),
        ('[openai."gpt-4o"]\ninput = inf\noutput = 2\n', "input must be a number"),
        # a cost out of 64-bit range would stop the ledger's writer: no price that large is real
        ('[openai."gpt-4o"]\ninput = 1e400\noutput = 2\n', "per million tokens from 0 to 100000"),
        ('[openai."gpt-4o"]\ninput = 1\noutput = 100001\n', "output must be a number"),
        ('[openai."gpt-4o"]\ninput = 1\n', "[openai.gpt-4o] needs output"),
        ('[openai."gpt-4o"]\ninput = 1\noutput = 2\ncached = 1\n', "unknown keys: cached"),
        ('[openai]\n"gpt-4o" = 2.5\n', "[openai.gpt-4o] must be a table of prices"),
        ("[openai]\ninput_includes_cache = 1\n", "[openai] input_includes_cache must be true or false"),
        ('[OpenAI."gpt-4o"]\ninput = 1\noutput = 2\n', "'OpenAI' is not a provider slug"),
        ("openai = 3\n", "[openai] must be a table of models"),
        ('checked = "yesterday"\n', "checked must be a date"),
    ],
)
def test_prices_file_refuses_malformed_content(tmp_path: Path, content: str, words: str) -> None:
    extra = tmp_path / "bad-prices.toml"
    extra.write_text(content)
    with pytest.raises(SettingsError) as caught:
        load_prices(extra)
    assert f"PRICES_FILE ({extra})" in str(caught.value)
    assert words in str(caught.value)


def test_model_names_with_dots_or_slashes_are_quoted_in_messages(tmp_path: Path) -> None:
    extra = tmp_path / "prices.toml"
    extra.write_text('[workers-ai."@cf/meta/llama-3.1-8b-instruct"]\ninput = 1\n')
    with pytest.raises(SettingsError, match=r'\[workers-ai\."@cf/meta/llama-3\.1-8b-instruct"\] needs output'):
        load_prices(extra)


def test_prices_file_missing_names_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"PRICES_FILE \(.*nowhere.toml\) cannot be read"):
        load_prices(tmp_path / "nowhere.toml")


def test_prices_file_setting(tmp_path: Path) -> None:
    assert Settings.from_env({}, env_file=None).prices_file is None
    assert Settings.from_env({"PRICES_FILE": " "}, env_file=None).prices_file is None
    assert Settings.from_env({"PRICES_FILE": "./prices.toml"}, env_file=None).prices_file == Path("prices.toml")


# Hand-computed: a token at p USD per million costs p micro-dollars.


def test_cost_openai_cached_input_is_part_of_prompt_tokens(table: PriceTable) -> None:
    # gpt-4o: 2.50 in, 1.25 cached, 10.00 out. prompt_tokens=1000 of which 400 cached, 300 out.
    # 600 * 2.50 + 400 * 1.25 + 300 * 10 = 1500 + 500 + 3000 = 5000 µ$
    assert table.cost_micro_usd("openai", "gpt-4o", 1000, 300, cache_read_tokens=400) == 5000


def test_cost_openai_reasoning_is_part_of_completion_tokens(table: PriceTable) -> None:
    # o4-mini: 1.10 in, 4.40 out. 1234 in, 5678 out of which 5000 reasoning (billed once, as output).
    # 1234 * 1.10 + 5678 * 4.40 = 1357.4 + 24983.2 = 26340.6 → 26341 µ$
    assert table.cost_micro_usd("openai", "o4-mini", 1234, 5678, reasoning_tokens=5000) == 26341
    assert table.cost_micro_usd("openai", "o4-mini", 1234, 5678) == 26341


def test_cost_anthropic_cache_counts_are_apart_from_input(table: PriceTable) -> None:
    # claude-sonnet-4-5: 3.00 in, 3.75 write, 0.30 read, 15.00 out.
    # input_tokens=50 (fresh), cache_creation=2000, cache_read=10000, output=321:
    # 50 * 3 + 2000 * 3.75 + 10000 * 0.30 + 321 * 15 = 150 + 7500 + 3000 + 4815 = 15465 µ$
    cost = table.cost_micro_usd("anthropic", "claude-sonnet-4-5-20250929", 50, 321, 10000, 2000)
    assert cost == 15465


def test_cost_gemini_thoughts_are_apart_from_candidates(table: PriceTable) -> None:
    # gemini-2.5-flash: 0.30 in, 0.03 cached, 2.50 out. promptTokenCount=10000 incl. 8000 cached,
    # candidatesTokenCount=200, thoughtsTokenCount=1000:
    # 2000 * 0.30 + 8000 * 0.03 + 200 * 2.50 + 1000 * 2.50 = 600 + 240 + 500 + 2500 = 3840 µ$
    assert table.cost_micro_usd("google-ai-studio", "gemini-2.5-flash", 10000, 200, 8000, 0, 1000) == 3840


def test_cost_separate_reasoning_price() -> None:
    # reasoning priced apart and included in output: 100 * 1 + (1000 - 600) * 2 + 600 * 3 = 2700 µ$
    price = Price(Decimal(1), Decimal(2), reasoning=Decimal(3))
    assert price.cost_micro_usd(100, 1000, reasoning_tokens=600) == 2700
    # reported apart from output: 100 * 1 + 1000 * 2 + 600 * 3 = 3900 µ$
    apart = replace(price, output_includes_reasoning=False)
    assert apart.cost_micro_usd(100, 1000, reasoning_tokens=600) == 3900


def test_cost_without_cache_prices_bills_cache_tokens_as_input() -> None:
    price = Price(Decimal("0.5"), Decimal(1))
    # 100 fresh + 50 read + 50 written, all at 0.5: 100 µ$
    assert price.cost_micro_usd(200, 0, 50, 50) == 100


def test_rounding_half_up_once_per_request() -> None:
    price = Price(Decimal("0.0375"), Decimal("0.15"))  # command-r7b
    assert price.cost_micro_usd(1, 0) == 0  # 0.0375
    assert price.cost_micro_usd(13, 0) == 0  # 0.4875
    assert price.cost_micro_usd(14, 0) == 1  # 0.525
    assert price.cost_micro_usd(0, 3) == 0  # 0.45
    assert price.cost_micro_usd(0, 10) == 2  # 1.5 → 2 (half up, not to even)
    # rounded once on the sum, not per part: 0.4875 + 0.45 = 0.9375 → 1
    assert price.cost_micro_usd(13, 3) == 1
    assert Price(Decimal("0.25"), Decimal(0)).cost_micro_usd(10, 0) == 3  # 2.5 → 3


def test_summing_many_costs_is_exact(table: PriceTable) -> None:
    price = table.price("openai", "gpt-4o-mini")
    assert price is not None
    # 1 input token at 0.15 µ$ → 0 each; 7 at 0.15 = 1.05 → 1; 1_000_000 requests of 7 tokens
    costs = [price.cost_micro_usd(7, 0) for _ in range(1_000_000)]
    assert all(isinstance(c, int) for c in costs) and sum(costs) == 1_000_000
    # large requests stay exact: 10^12 tokens at 0.075 µ$ = 75_000_000_000 µ$ exactly
    assert price.cost_micro_usd(10**12, 0, cache_read_tokens=10**12) == 75_000_000_000
    many = [table.cost_micro_usd("anthropic", "claude-haiku-4-5", n, n, n, n) for n in range(1, 2001)]
    # per request: n * (1 + 5 + 0.10 + 1.25) = 7.35 n µ$, each rounded half up
    assert sum(c or 0 for c in many) == sum(int(Decimal(n) * Decimal("7.35") + Decimal("0.5")) for n in range(1, 2001))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((-1, 0), "whole numbers from 0"),
        ((1.5, 0), "whole numbers from 0"),
        ((True, 0), "whole numbers from 0"),
        ((100, 0, 80, 30), "must include cache_read_tokens"),
        ((0, 10, 0, 0, 11), "must include reasoning_tokens"),
    ],
)
def test_inconsistent_counts_are_refused(args: tuple[int, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Price(Decimal(1), Decimal(1)).cost_micro_usd(*args)


def test_anthropic_counts_need_not_include_cache(table: PriceTable) -> None:
    # Anthropic's input_tokens may be smaller than its cache counts
    assert table.cost_micro_usd("anthropic", "claude-haiku-4-5", 0, 0, 1000, 0) == 100


def test_provider_prices_defaults_to_the_openai_shape() -> None:
    assert ProviderPrices() == ProviderPrices(True, True, {})
