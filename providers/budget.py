"""A request's worst case, for budgets and tokens-per-minute limits, before it goes upstream.

Read only for requests whose team or key has such a limit. The output is the request's own
maximum (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, Gemini's
``generationConfig.maxOutputTokens``), else ``BUDGET_DEFAULT_MAX_TOKENS``; the prompt is estimated
as one token per 4 bytes of the body. The worst case is both at the model's prices, input and output
(per million tokens, found once per model).
"""

from __future__ import annotations

import orjson
from starlette.types import Scope

from providers.metering import BODY_LOOKED_AT, BODY_MODEL, MODELS_IN_PATH, Pricer, path_model
from providers.prices import PriceTable
from providers.usage import Usage
from service.core.limits.outcome import Estimate
from service.core.request import REST_KEY

BYTES_PER_TOKEN = 4
MAX_OUTPUT_TOKENS = 10_000_000
MILLION = 1_000_000
_UNKNOWN = (-1, -1)
"""A model not priced yet (``BudgetEstimator._rates``)."""
_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_KEY_END = b'okens"'
"""How every name ``output_limit`` reads ends (``…_tokens``, ``maxOutputTokens``), as a key in the
JSON text (quoted, unescaped): a body without it names none of them, at any depth, and is not parsed."""


def _whole(value: object) -> int | None:
    """A maximum the request sets: a whole number from 1. A maximum of 0 is none: providers refuse
    it or write past it, so it must not reserve nothing against a budget."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return min(value, MAX_OUTPUT_TOKENS)
    return None


def output_limit(body: bytes) -> int | None:
    """The most the request lets the model write, when it says."""
    if body.find(_KEY_END) < 0:
        return None
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
        self.pricer = None if prices is None else Pricer(prices, provider)
        self.default_max_tokens = default_max_tokens
        self._rates: dict[str, tuple[int, int] | None] = {}
        self.models_in_path = provider in MODELS_IN_PATH

    def rates(self, model: str) -> tuple[int, int] | None:
        """What a million input tokens and a million output tokens of ``model`` cost, in
        micro-dollars (a price in USD per million tokens is micro-dollars per token), found once."""
        if model in self._rates:
            return self._rates[model]
        assert self.pricer is not None
        if len(self._rates) >= 10_000:
            self._rates.clear()
        million_in = Usage(input_tokens=MILLION, output_tokens=0, found=True)
        million_out = Usage(input_tokens=0, output_tokens=MILLION, found=True)
        per_input = self.pricer.cost(model, million_in)
        per_output = self.pricer.cost(model, million_out)
        found = None if per_input is None or per_output is None else (per_input, per_output)
        self._rates[model] = found
        return found

    def __call__(self, scope: Scope, body: bytes) -> Estimate:
        prompt = (len(body) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
        model = path_model(self.provider, scope[REST_KEY]) if self.models_in_path else None
        if model is None:  # as metering.request_model, inline: every request under a budget asks
            match = BODY_MODEL.search(body, 0, BODY_LOOKED_AT)
            model = match.group(1).decode("utf-8", "replace") if match is not None else None
        if self.pricer is None or model is None:
            return (prompt, None, model)
        rates = self._rates.get(model, _UNKNOWN)
        if rates is _UNKNOWN:
            rates = self.rates(model)
        if rates is None:
            return (prompt, None, model)
        output = output_limit(body)
        if output is None:
            output = self.default_max_tokens
        # both at once, rounded half up once, as the metering prices a response
        return (prompt, (prompt * rates[0] + output * rates[1] + MILLION // 2) // MILLION, model)
