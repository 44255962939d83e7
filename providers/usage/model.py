"""What a usage reader returns, and the protocol every reader follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Usage:
    """Token usage of one response, as read from the upstream's own figures.

    The fields mean the same for every provider (``None``: not reported, or not readable):

    - ``input_tokens``: every prompt token, *including* cache reads and cache writes. OpenAI and the
      OpenAI-compatible providers, Google and Cohere report it so already; for Anthropic, whose
      ``input_tokens`` counts only the uncached part, it is ``input_tokens +
      cache_creation_input_tokens + cache_read_input_tokens``.
    - ``output_tokens``: every generated token, *including* reasoning tokens. OpenAI reports it so;
      for Google it is ``candidatesTokenCount + thoughtsTokenCount``, for Perplexity
      ``completion_tokens + reasoning_tokens``. Other OpenAI-compatible providers: their
      ``completion_tokens`` as reported. Embeddings: ``0``.
    - ``cache_read_tokens`` / ``cache_write_tokens``: the cached parts of ``input_tokens``
      (OpenAI ``cached_tokens``, DeepSeek ``prompt_cache_hit_tokens``, Anthropic
      ``cache_read_input_tokens`` / ``cache_creation_input_tokens``, Google
      ``cachedContentTokenCount``).
    - ``reasoning_tokens``: the reasoning part of ``output_tokens`` (OpenAI ``reasoning_tokens``,
      Google ``thoughtsTokenCount``); Anthropic does not report it.
    - ``model``: the model the upstream names in its answer (``modelVersion`` for Google); Cohere
      v2 and Workers AI's native endpoints name none.
    - ``found``: some token count was read.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    model: str | None = None
    found: bool = False


class UsageReader(Protocol):
    """Reads usage on the side of one response body.

    ``feed`` gets every raw body chunk as received (any boundaries, still compressed), ``result``
    is called once at the end, also after a cut. Neither ever raises: a reader that meets something
    it does not understand stops looking. A reader holds a bounded amount of the body, never all.
    """

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> Usage: ...


class NoUsage:
    """The reader for responses that cannot hold usage (errors, other content types)."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> None:
        return None

    def result(self) -> Usage:
        return Usage()
