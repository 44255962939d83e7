"""What a request cost: list prices per provider and model (``prices.toml``, plus ``PRICES_FILE``) and
exact integer arithmetic on the token counts a provider reports.

Finding a model's price (``PriceTable.price``), in this order, first hit wins:

1. the exact model name in the provider's table;
2. its family, for a dated snapshot or an alias: one trailing ``-YYYY-MM-DD`` (OpenAI), ``-YYYYMMDD``
   (Anthropic) or ``@YYYYMMDD`` (Anthropic on Vertex), or ``-latest``, removed, then an exact match
   again (``gpt-4o-2024-08-06`` → ``gpt-4o``, ``claude-haiku-4-5-20251001`` → ``claude-haiku-4-5``);
3. for ``compat`` and ``openrouter``, a ``{provider}/{model}`` name is looked up by 1-2 in that
   provider's table (``openai/gpt-4o``, ``workers-ai/@cf/meta/…``; OpenRouter's ``google``, ``x-ai``,
   ``mistralai`` and ``perplexity`` prefixes name our ``google-ai-studio``, ``grok``, ``mistral`` and
   ``perplexity-ai``); for ``azure-openai``, whose deployments customers name, the model the response
   reports is looked up by 1-2 in ``openai``'s table when ``azure-openai`` has no entry of its own.

Nothing else: no prefix or fuzzy match, so ``gpt-4o-mini`` can never be priced as ``gpt-4o``, and an
unknown model is ``None``, never 0. Four-digit suffixes (``-0125``, ``-0309``) are not stripped: Mistral
uses them for versions (``mistral-large-2411``) and xAI inside its ids, so stripping could price one
model as another.

Costs are integer micro-dollars (``1 USD = 1_000_000``). Prices stay ``Decimal`` (the TOML is parsed
without floats), a token at ``p`` USD per million costs exactly ``p`` micro-dollars, and the sum over a
request is rounded half up to a whole micro-dollar once, at the end; summing requests is then exact.

Counts are passed as the provider reports them; each provider's table says how to read them:
``input_includes_cache`` (OpenAI's ``prompt_tokens``, Gemini's ``promptTokenCount``, DeepSeek's
``prompt_tokens`` include cached tokens; Anthropic's ``input_tokens`` excludes cache reads and writes)
and ``output_includes_reasoning`` (OpenAI's and DeepSeek's ``completion_tokens`` and Anthropic's
``output_tokens`` include reasoning; Gemini's ``thoughtsTokenCount`` and xAI's ``reasoning_tokens``
come apart from the output count). Through ``compat`` and ``openrouter`` the counts are in the OpenAI
shape whatever the model, so those two tables' conventions apply, with the underlying model's prices.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

from config import SettingsError

PRICES = Path(__file__).with_name("prices.toml")
PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")
CONVENTION_KEYS = ("input_includes_cache", "output_includes_reasoning")
# providers whose model names are "{provider}/{model}", priced from that provider's table
ROUTERS = frozenset({"compat", "openrouter"})
# OpenRouter's provider prefixes that differ from our slugs
ROUTER_PREFIXES = {"google": "google-ai-studio", "x-ai": "grok", "mistralai": "mistral", "perplexity": "perplexity-ai"}
# providers that serve another provider's models under the same names
PRICED_AS = {"azure-openai": "openai"}
_SNAPSHOT = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-20\d{6}|@20\d{6}|-latest)$")
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens for one model, with how its provider counts tokens.

    ``cache_read``/``cache_write`` absent: those tokens cost the input price (the provider gives no
    discount or has no such charge); ``reasoning`` absent: reasoning tokens cost the output price."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    input_includes_cache: bool = True
    output_includes_reasoning: bool = True

    def cost_micro_usd(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int:
        """The request's cost in whole micro-dollars, rounded half up once.

        Counts as the provider reports them: with ``input_includes_cache`` the cache reads and writes
        are taken out of ``input_tokens`` before it is billed at the input price; with
        ``output_includes_reasoning`` the reasoning tokens are taken out of ``output_tokens`` (they are
        billed once, at ``reasoning`` or else the output price). A negative count, or parts larger than
        the total that includes them, is a caller error: ``ValueError``."""
        counts = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"token counts must be whole numbers from 0, got {counts}")
        fresh_input = input_tokens
        if self.input_includes_cache:
            fresh_input -= cache_read_tokens + cache_write_tokens
            if fresh_input < 0:
                raise ValueError(
                    f"input_tokens ({input_tokens}) must include cache_read_tokens ({cache_read_tokens})"
                    f" and cache_write_tokens ({cache_write_tokens}) for this provider"
                )
        answer = output_tokens
        if self.output_includes_reasoning:
            answer -= reasoning_tokens
            if answer < 0:
                raise ValueError(
                    f"output_tokens ({output_tokens}) must include reasoning_tokens ({reasoning_tokens})"
                    " for this provider"
                )
        with localcontext() as ctx:
            ctx.prec = 60  # exact for any realistic count times any price with few decimals
            total = (
                fresh_input * self.input
                + answer * self.output
                + cache_read_tokens * (self.input if self.cache_read is None else self.cache_read)
                + cache_write_tokens * (self.input if self.cache_write is None else self.cache_write)
                + reasoning_tokens * (self.output if self.reasoning is None else self.reasoning)
            )
            return int(total.quantize(_ONE, rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class ProviderPrices:
    """One provider's table: its counting conventions and its models' prices (which carry them too)."""

    input_includes_cache: bool = True
    output_includes_reasoning: bool = True
    models: Mapping[str, Price] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Every provider's prices; ``checked`` is the date the shipped figures were last checked."""

    providers: Mapping[str, ProviderPrices]
    checked: str | None = None

    def price(self, provider: str, model: str) -> Price | None:
        """The price of ``model`` called through ``provider`` by the rule in the module docstring, or
        ``None`` when it is not known (never a guess)."""
        found = self._own(provider, model)
        if found is not None:
            return found
        if provider in PRICED_AS:
            return self._own(PRICED_AS[provider], model)
        if provider in ROUTERS:
            prefix, slash, name = model.partition("/")
            if not slash or not name:
                return None
            underlying = self._own(ROUTER_PREFIXES.get(prefix, prefix), name)
            if underlying is None:
                return None
            conventions = self.providers.get(provider, ProviderPrices())
            return replace(
                underlying,
                input_includes_cache=conventions.input_includes_cache,
                output_includes_reasoning=conventions.output_includes_reasoning,
            )
        return None

    def cost_micro_usd(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int | None:
        """``price(provider, model).cost_micro_usd(…)``, or ``None`` for a model without a price."""
        price = self.price(provider, model)
        if price is None:
            return None
        return price.cost_micro_usd(
            input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens
        )

    def _own(self, provider: str, model: str) -> Price | None:
        """Steps 1-2: exact name, then the family of a dated snapshot or ``-latest`` alias."""
        table = self.providers.get(provider)
        if table is None:
            return None
        found = table.models.get(model)
        if found is None:
            family = _SNAPSHOT.sub("", model)
            if family != model and family:
                found = table.models.get(family)
        return found


def load_prices(extra: Path | None = None) -> PriceTable:
    """The shipped table, then ``extra`` (``PRICES_FILE``) adding providers and models or replacing
    them (a model entry whole; a provider's conventions key by key). A malformed file raises
    ``SettingsError`` naming it and the bad entry."""
    checked, providers = _from_toml(PRICES)
    if extra is not None:
        extra_checked, extra_providers = _from_toml(extra, setting="PRICES_FILE")
        checked = extra_checked or checked
        for slug, entry in extra_providers.items():
            base = providers.setdefault(slug, {"models": {}})
            base.update((key, entry[key]) for key in CONVENTION_KEYS if key in entry)
            base["models"] = {**base["models"], **entry["models"]}
    return PriceTable(providers={slug: _finish(entry) for slug, entry in providers.items()}, checked=checked)


def _finish(entry: dict[str, Any]) -> ProviderPrices:
    """The provider's conventions stamped on each of its prices."""
    includes_cache = bool(entry.get("input_includes_cache", True))
    includes_reasoning = bool(entry.get("output_includes_reasoning", True))
    models = {
        name: replace(price, input_includes_cache=includes_cache, output_includes_reasoning=includes_reasoning)
        for name, price in entry["models"].items()
    }
    return ProviderPrices(includes_cache, includes_reasoning, models)


def _from_toml(path: Path, setting: str | None = None) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """``checked`` and, per provider slug, its convention keys as given and its ``models``."""
    where = f"{setting} ({path})" if setting else str(path)
    try:
        data = tomllib.loads(path.read_text(), parse_float=Decimal)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{where} cannot be read as TOML: {exc}") from exc
    checked = data.pop("checked", None)
    if checked is not None and not (isinstance(checked, str) and _DATE.fullmatch(checked)):
        raise SettingsError(f'{where}: checked must be a date like "2026-11-30", got {checked!r}')
    providers: dict[str, dict[str, Any]] = {}
    for slug, entry in data.items():
        if not _SLUG.fullmatch(slug):
            raise SettingsError(f"{where}: {slug!r} is not a provider slug (lower case, digits and '-')")
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: [{slug}] must be a table of models")
        parsed: dict[str, Any] = {"models": {}}
        for key, value in entry.items():
            if key in CONVENTION_KEYS:
                if not isinstance(value, bool):
                    raise SettingsError(f"{where}: [{slug}] {key} must be true or false")
                parsed[key] = value
            else:
                parsed["models"][key] = _price(value, f"{where}: [{slug}.{_quoted(key)}]")
        providers[slug] = parsed
    return checked, providers


def _price(entry: Any, where: str) -> Price:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where} must be a table of prices (input, output, …)")
    unknown = set(entry) - set(PRICE_KEYS)
    if unknown:
        raise SettingsError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    missing = [key for key in ("input", "output") if key not in entry]
    if missing:
        raise SettingsError(f"{where} needs {' and '.join(missing)}")
    values: dict[str, Decimal] = {}
    for key, value in entry.items():
        amount = _amount(value)
        if amount is None:
            raise SettingsError(
                f"{where} {key} must be a number of USD per million tokens from 0 to {MAX_PRICE}, got {value!r}"
            )
        values[key] = amount
    return Price(
        values["input"],
        values["output"],
        cache_read=values.get("cache_read"),
        cache_write=values.get("cache_write"),
        reasoning=values.get("reasoning"),
    )


MAX_PRICE = Decimal(100_000)
"""The highest price taken, in USD per million tokens (the dearest model in the shipped table costs
180): a larger one is a mistake in the file, and refusing it keeps every cost within 64-bit integers
of micro-dollars (``providers.usage.dialects.MAX_COUNT`` tokens at this price fit a thousand times)."""


def _amount(value: Any) -> Decimal | None:
    """A price from 0 to ``MAX_PRICE``, or ``None``; bool (an int to Python) and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    amount = Decimal(value)
    if not amount.is_finite() or not 0 <= amount <= MAX_PRICE:
        return None
    return amount


def _quoted(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'
