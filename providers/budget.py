"""A request's worst case, for budgets and tokens-per-minute limits, before it goes upstream.

Read only for requests whose team or key has such a limit. The output is the request's own
maximum (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, Gemini's
``generationConfig.maxOutputTokens``), else ``BUDGET_DEFAULT_MAX_TOKENS``; the prompt is estimated
as one token per 4 bytes of the body. The worst case is both at the model's prices, input and output.
"""

from __future__ import annotations

import math

import orjson
from starlette.types import Scope

from providers.metering import cost_micro_usd, request_model
from providers.prices import PriceTable
from providers.usage import Usage
from service.core.limits.outcome import Estimate
from service.core.request import REST_KEY

BYTES_PER_TOKEN = 4
MAX_OUTPUT_TOKENS = 10_000_000
_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _whole(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_OUTPUT_TOKENS)
    return None


def output_limit(body: bytes) -> int | None:
    """The most the request lets the model write, when it says."""
    try:
        payload = orjson.loads(body) if body[:1] == b"{" else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    for name in _FIELDS:
        found = _whole(payload.get(name))
        if found is not None:
            return found
    config = payload.get("generationConfig")
    return _whole(config.get("maxOutputTokens")) if isinstance(config, dict) else None


class BudgetEstimator:
    def __init__(self, provider: str, prices: PriceTable | None, default_max_tokens: int) -> None:
        self.provider = provider
        self.prices = prices
        self.default_max_tokens = default_max_tokens

    def __call__(self, scope: Scope, body: bytes) -> Estimate:
        rest: str = scope[REST_KEY]
        prompt = math.ceil(len(body) / BYTES_PER_TOKEN)
        model = request_model(self.provider, rest, body)
        output = output_limit(body)
        if output is None:
            output = self.default_max_tokens
        cost = None
        if self.prices is not None and model is not None:
            usage = Usage(input_tokens=prompt, output_tokens=output, found=True)
            cost = cost_micro_usd(self.prices, self.provider, model, usage)
        return Estimate(prompt, cost, model)
