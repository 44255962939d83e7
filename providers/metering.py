"""Metering one proxied request: the model it names, and what its usage costs.

The usage itself is read on the side of the response by ``providers.usage``; this module supplies
what that cannot: the model the request named (the answer's own model wins when it has one) and the
price. The request's model is found without copying or re-serialising its body: a bounded regular
expression over the first body chunk the relay already holds, only when the upstream named none.
"""

from __future__ import annotations

import re

from providers.prices import Price, PriceTable
from providers.usage import Usage

BODY_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_GEMINI_MODEL = re.compile(r"models/([^/:?]{1,200})")
BODY_LOOKED_AT = 64 * 1024


MODELS_IN_PATH = frozenset({"google-ai-studio", "workers-ai", "azure-openai"})
"""The providers whose paths may name the model (``path_model``)."""


def path_model(provider: str, rest: str) -> str | None:
    """The model a provider's path names: Gemini ``models/{m}:…``, Workers AI ``@cf/…``, Azure's
    deployment (``{resource}/{deployment}/…``)."""
    if provider not in MODELS_IN_PATH:
        return None
    if provider == "google-ai-studio":
        found = _GEMINI_MODEL.search(rest)
        return found.group(1) if found else None
    if provider == "workers-ai" and rest.startswith(("@cf/", "@hf/")):
        return rest.partition("?")[0]
    if provider == "azure-openai":
        _, _, tail = rest.partition("/")
        tail = tail.removeprefix("openai/deployments/")
        deployment = tail.partition("/")[0]
        return deployment or None
    return None


def request_model(provider: str, rest: str, body: bytes) -> str | None:
    """The model the request named: in its path for the providers that put it there, else the
    body's ``model`` (looked for in the first ``BODY_LOOKED_AT`` bytes the relay received)."""
    found = path_model(provider, rest)
    if found is not None:
        return found
    if body:
        match = BODY_MODEL.search(body, 0, BODY_LOOKED_AT)
        if match is not None:
            return match.group(1).decode("utf-8", "replace")
    return None


Rates = tuple[int, int, int, int, int]
_MAX_MODELS = 10_000
_SCALE = 10**6


def _rates(price: Price) -> Rates | None:
    """A price's rates as whole millionths of a micro-dollar per token (a price in USD per million
    tokens is exactly micro-dollars per token); ``None`` for a price with more than six decimals."""
    parts = (
        price.input,
        price.output,
        price.input if price.cache_read is None else price.cache_read,
        price.input if price.cache_write is None else price.cache_write,
        price.output if price.reasoning is None else price.reasoning,
    )
    scaled = tuple(part * _SCALE for part in parts)
    if not all(value == int(value) for value in scaled):
        return None
    a, b, c, d, e = (int(value) for value in scaled)
    return (a, b, c, d, e)


class Pricer:
    """What one provider's responses cost, each model's price and rates found once (the relay keeps
    one per provider; a model's lookup is then one dictionary read)."""

    __slots__ = ("_rated", "prices", "provider")

    def __init__(self, prices: PriceTable, provider: str) -> None:
        self.prices = prices
        self.provider = provider
        self._rated: dict[str, tuple[Price, Rates | None] | None] = {}

    def _find(self, model: str) -> tuple[Price, Rates | None] | None:
        price = self.prices.price(self.provider, model)
        found = None if price is None else (price, _rates(price))
        if len(self._rated) >= _MAX_MODELS:  # model names come from requests and answers
            self._rated.clear()
        self._rated[model] = found
        return found

    def cost(self, model: str | None, usage: Usage) -> int | None:
        """What ``usage`` costs, exactly, in micro-dollars; ``None`` when unpriced or not known.

        ``Usage`` counts every prompt token in ``input_tokens`` and every generated one in
        ``output_tokens`` for every provider; a price states how its provider counts (Anthropic's
        input leaves cache tokens out, Google's output leaves thoughts out), so the counts are put
        back in the provider's own terms first. Integer arithmetic on the rates gives the same
        result as ``Price.cost_micro_usd`` (one rounding, half up), which prices with more than six
        decimals still use."""
        if model is None or (usage.input_tokens is None and usage.output_tokens is None):
            return None
        try:
            found = self._rated[model]
        except KeyError:
            found = self._find(model)
        if found is None:
            return None
        price, rates = found
        if rates is None:
            return _decimal_cost(price, usage)
        per_input, per_output, per_cache_read, per_cache_write, per_reasoning = rates
        # _in_provider_terms, inlined (every metered response comes through here)
        cache_read = usage.cache_read_tokens or 0
        cache_write = usage.cache_write_tokens or 0
        reasoning = usage.reasoning_tokens or 0
        fresh = (usage.input_tokens or 0) - cache_read - cache_write
        answer = (usage.output_tokens or 0) - reasoning
        if fresh < 0:
            if price.input_includes_cache:
                return None  # counts the provider reported inconsistently: unknown, never a guess
            fresh = 0
        if answer < 0:
            if price.output_includes_reasoning:
                return None
            answer = 0
        total = (
            fresh * per_input
            + answer * per_output
            + cache_read * per_cache_read
            + cache_write * per_cache_write
            + reasoning * per_reasoning
        )
        return (total + _SCALE // 2) // _SCALE


def _in_provider_terms(price: Price, usage: Usage) -> tuple[int, int, int, int, int]:
    cache_read = usage.cache_read_tokens or 0
    cache_write = usage.cache_write_tokens or 0
    reasoning = usage.reasoning_tokens or 0
    input_tokens = usage.input_tokens or 0
    output_tokens = usage.output_tokens or 0
    if not price.input_includes_cache:
        input_tokens = max(0, input_tokens - cache_read - cache_write)
    if not price.output_includes_reasoning:
        output_tokens = max(0, output_tokens - reasoning)
    return input_tokens, output_tokens, cache_read, cache_write, reasoning


def _decimal_cost(price: Price, usage: Usage) -> int | None:
    try:
        return price.cost_micro_usd(*_in_provider_terms(price, usage))
    except ValueError:  # counts the provider reported inconsistently: unknown, never a guess
        return None
