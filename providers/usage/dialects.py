"""Where each provider family puts its usage, and how its fields map onto ``Usage``.

A ``Dialect`` is what the stream and body readers need to know about one family:

- ``usage_keys``: the JSON keys whose *object* value carries usage (``"usage"``,
  ``"usageMetadata"``), as raw bytes with their quotes. Readers look for them before parsing
  anything, so an event or body without one costs a substring search.
- ``model_key``: the key naming the model, looked for while the model is still unknown.
- ``last_wins``: a later usage event replaces the earlier ones whole (Google sends usage in every
  chunk), so the stream reader keeps the last one raw and parses it once, at the end.
- ``event`` merges one parsed stream event or one whole parsed body; ``usage_object`` merges a bare
  usage object cut out of a bounded window (a large body, an oversized event).

Later figures override earlier ones field by field (``None`` never overrides), which is what
cumulative counters need (Anthropic's ``message_delta``) and never sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from providers.usage.model import Usage

Merge = Callable[[Usage, Any], None]


MAX_COUNT = 10**10
"""The largest token count taken as one (ten billion, thousands of times any context window): a
larger figure is not understood, so that what the ledger, the access line and the metrics add up
stays within 64-bit integers whatever an upstream sends."""


def count(value: Any) -> int | None:
    """A token count: an int from 0 to ``MAX_COUNT`` (integral floats accepted, Cohere's SDK types them so)."""
    kind = type(value)
    if kind is int:  # the common case first: one type check
        return value if 0 <= value <= MAX_COUNT else None
    if value is None or kind is bool:
        return None
    if isinstance(value, int):
        return int(value) if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_COUNT:
        return int(value)
    return None


def _obj(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _set(
    usage: Usage,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    cache_read: int | None = None,
    cache_write: int | None = None,
    reasoning: int | None = None,
) -> None:
    if input_tokens is not None:
        usage.input_tokens = input_tokens
    if output_tokens is not None:
        usage.output_tokens = output_tokens
    if cache_read is not None:
        usage.cache_read_tokens = cache_read
    if cache_write is not None:
        usage.cache_write_tokens = cache_write
    if reasoning is not None:
        usage.reasoning_tokens = reasoning
    if (
        input_tokens is not None
        or output_tokens is not None
        or cache_read is not None
        or cache_write is not None
        or reasoning is not None
    ):
        usage.found = True


def _model(usage: Usage, value: Any) -> None:
    # Azure's first stream chunk (prompt filter results) names the model as ""
    if isinstance(value, str) and value:
        usage.model = value


# OpenAI and the OpenAI-compatible providers


def openai_usage(usage: Usage, data: Any) -> None:
    """Chat completions / completions / embeddings (``prompt_tokens``…) and the Responses API
    (``input_tokens``…) name the same figures differently; both shapes are read. DeepSeek's
    ``prompt_cache_hit_tokens`` stands for ``cached_tokens``. Perplexity puts ``reasoning_tokens``
    at the top of ``usage``, counted beside ``completion_tokens`` rather than inside it, so they are
    added to ``output_tokens`` there. ``prompt_tokens`` includes the cached tokens for all of them.

    Every metered OpenAI-format response comes through here: a plain non-negative int is taken as
    it is, and ``count`` is called only for anything else."""
    if not isinstance(data, dict):
        return
    get = data.get
    prompt = get("prompt_tokens")
    if type(prompt) is not int or not 0 <= prompt <= MAX_COUNT:
        prompt = count(prompt)
        if prompt is None:
            prompt = count(get("input_tokens"))
    completion = get("completion_tokens")
    if type(completion) is not int or not 0 <= completion <= MAX_COUNT:
        completion = count(completion)
        if completion is None:
            completion = count(get("output_tokens"))
    details = get("prompt_tokens_details") or get("input_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        hits = get("prompt_cache_hit_tokens")
        if hits is not None:
            cached = count(hits)
    out_details = get("completion_tokens_details") or get("output_tokens_details")
    reasoning = count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
    if reasoning is None:
        beside = get("reasoning_tokens")
        if beside is not None:
            reasoning = count(beside)
            if reasoning is not None and completion is not None:
                completion += reasoning  # beside completion_tokens, not part of it (Perplexity bills both)
    _set(usage, prompt, completion, cached, None, reasoning)


def openai_event(usage: Usage, data: Any) -> None:
    """One chat completion chunk or body (``usage``, Groq's ``x_groq.usage``) or one Responses API
    event or body (``response.usage`` in ``response.completed``)."""
    if not isinstance(data, dict):
        return
    get = data.get
    model = get("model")
    if model and isinstance(model, str):  # as _model does
        usage.model = model
    response = get("response")
    if response is not None and isinstance(response, dict):
        _model(usage, response.get("model"))
        openai_usage(usage, response.get("usage"))
    groq = get("x_groq")
    if groq is not None:
        openai_usage(usage, _obj(groq, "usage"))
    found = get("usage")
    if found is not None:
        openai_usage(usage, found)


def workers_ai_event(usage: Usage, data: Any) -> None:
    """Workers AI native: a body wraps its answer in ``result`` (``{"result": {"response": …,
    "usage": {…}}, "success": true}``), a stream event is ``{"response": …, "usage": {…}}``. The
    usage fields are OpenAI's."""
    if isinstance(data, dict) and isinstance(data.get("result"), dict):
        data = data["result"]
    openai_event(usage, data)


# Anthropic


def anthropic_usage(usage: Usage, data: Any) -> None:
    """Anthropic's ``input_tokens`` leaves out the cached part; ``Usage.input_tokens`` adds cache
    writes and reads back. ``output_tokens`` in ``message_delta`` is cumulative: the last wins."""
    if not isinstance(data, dict):
        return
    uncached = count(data.get("input_tokens"))
    write = count(data.get("cache_creation_input_tokens"))
    read = count(data.get("cache_read_input_tokens"))
    total = None
    if uncached is not None:
        known_write = write if write is not None else usage.cache_write_tokens
        known_read = read if read is not None else usage.cache_read_tokens
        total = uncached + (known_write or 0) + (known_read or 0)
    _set(usage, input_tokens=total, output_tokens=count(data.get("output_tokens")), cache_read=read, cache_write=write)


def anthropic_event(usage: Usage, data: Any) -> None:
    """``message_start`` (``message.usage``, ``message.model``), ``message_delta`` (``usage``), or
    a whole message body (``usage``, ``model``)."""
    if not isinstance(data, dict):
        return
    message = data.get("message")
    if isinstance(message, dict):
        _model(usage, message.get("model"))
        anthropic_usage(usage, message.get("usage"))
    _model(usage, data.get("model"))
    anthropic_usage(usage, data.get("usage"))


# Google AI Studio (Gemini)


def google_usage(usage: Usage, data: Any) -> None:
    """``usageMetadata``: ``promptTokenCount`` includes ``cachedContentTokenCount``;
    ``candidatesTokenCount`` leaves out ``thoughtsTokenCount``, which ``output_tokens`` adds back."""
    if not isinstance(data, dict):
        return
    candidates = count(data.get("candidatesTokenCount"))
    thoughts = count(data.get("thoughtsTokenCount"))
    output = None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    _set(
        usage,
        input_tokens=count(data.get("promptTokenCount")),
        output_tokens=output,
        cache_read=count(data.get("cachedContentTokenCount")),
        reasoning=thoughts,
    )


def google_event(usage: Usage, data: Any) -> None:
    """One ``GenerateContentResponse`` (a body, an SSE event) or the JSON array
    ``:streamGenerateContent`` sends without ``alt=sse`` (each element in turn, the last wins)."""
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict):
            _model(usage, item.get("modelVersion"))
            google_usage(usage, item.get("usageMetadata"))


# Cohere v2


def cohere_usage(usage: Usage, data: Any) -> None:
    """``usage`` (v2 chat) or ``meta`` (embed, v1): ``billed_units`` what Cohere bills, ``tokens``
    the tokens the model saw (the prompt template included, which is not billed); ``billed_units``
    first, so that the cost is what the invoice says, ``tokens`` when it is missing."""
    if not isinstance(data, dict):
        return
    tokens = data.get("tokens")
    billed = data.get("billed_units")
    prompt = count(_obj(billed, "input_tokens"))
    if prompt is None:
        prompt = count(_obj(tokens, "input_tokens"))
    completion = count(_obj(billed, "output_tokens"))
    if completion is None:
        completion = count(_obj(tokens, "output_tokens"))
    _set(usage, input_tokens=prompt, output_tokens=completion, cache_read=count(data.get("cached_tokens")))


def cohere_event(usage: Usage, data: Any) -> None:
    """A v2 chat body (``usage``), an embed body (``meta``) or the stream's ``message-end`` event
    (``delta.usage``)."""
    if not isinstance(data, dict):
        return
    cohere_usage(usage, _obj(data.get("delta"), "usage"))
    if isinstance(data.get("usage"), dict):
        cohere_usage(usage, data["usage"])
    else:
        cohere_usage(usage, data.get("meta"))


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    event: Merge
    usage_object: Merge
    usage_keys: tuple[bytes, ...] = (b'"usage"',)
    model_key: bytes | None = b'"model"'
    last_wins: bool = False
    embeddings: bool = False
    """Embeddings produce no output tokens: ``output_tokens`` is 0 once the input is known."""


OPENAI = Dialect("openai", openai_event, openai_usage)
ANTHROPIC = Dialect("anthropic", anthropic_event, anthropic_usage)
GOOGLE = Dialect(
    "google", google_event, google_usage, usage_keys=(b'"usageMetadata"',), model_key=b'"modelVersion"', last_wins=True
)
COHERE = Dialect("cohere", cohere_event, cohere_usage, usage_keys=(b'"usage"', b'"meta"'), model_key=None)
WORKERS_AI = Dialect("workers-ai", workers_ai_event, openai_usage)
