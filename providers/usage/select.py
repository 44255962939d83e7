"""Choosing the reader for one response, from what the relay knows when the headers arrive."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

from providers.usage.decode import ENCODINGS, DecodingReader
from providers.usage.dialects import ANTHROPIC, COHERE, GOOGLE, OPENAI, WORKERS_AI, Dialect
from providers.usage.model import NoUsage, UsageReader
from providers.usage.readers import BodyReader, StreamReader

_OPENAI_EMBEDDINGS = dataclasses.replace(OPENAI, embeddings=True)
_COHERE_EMBED = dataclasses.replace(COHERE, embeddings=True)
_FORMATS = frozenset({"openai-sse", "anthropic-sse", "google-sse", "cohere-sse", "workers-ai-sse"})
_MAX_FOUND = 4096
"""Decisions kept per worker (paths come from requests: past this many, they are made each time)."""


def _route(path: str) -> str:
    return path.partition("?")[0].strip("/")


def dialect_for(stream_format: str, path: str) -> Dialect | None:
    """The dialect a provider's response at ``path`` speaks, ``None`` if unknown.

    ``path`` is the part after the provider's mount (``v1/chat/completions``,
    ``@cf/meta/llama-3.1-8b-instruct``, ``v1beta/models/gemini-2.0-flash:generateContent``); a
    leading ``/`` and a query string are ignored. The provider's ``stream_format`` decides, except
    on the OpenAI-compatible endpoints the other families also serve: Workers AI's ``v1/…`` (its
    native models are ``@cf/…``/``@hf/…``), Anthropic's and Cohere's ``…/chat/completions``,
    Google's ``…/openai/…``.
    """
    if stream_format not in _FORMATS:
        return None
    route = _route(path)
    if stream_format == "workers-ai-sse":
        native = route.startswith("@") or "/@" in route
        dialect = WORKERS_AI if native else OPENAI
    elif (
        stream_format == "openai-sse" or route.endswith("chat/completions") or route.rsplit("/", 1)[-1] == "embeddings"
    ):
        dialect = OPENAI
    elif stream_format == "anthropic-sse":
        dialect = ANTHROPIC
    elif stream_format == "google-sse":
        dialect = OPENAI if route.startswith("openai/") or "/openai/" in route else GOOGLE
    elif stream_format == "cohere-sse":
        dialect = COHERE
    else:
        return None
    last = route.rsplit("/", 1)[-1]
    if dialect is OPENAI and last == "embeddings":
        return _OPENAI_EMBEDDINGS
    if dialect is COHERE and last == "embed":
        return _COHERE_EMBED
    return dialect


Maker = Callable[[], UsageReader]
_MAKERS: dict[tuple[str, str, str, str | None], Maker | None] = {}
"""What ``usage_reader`` decided, by (stream format, path, content type, content encoding): found
once per worker for the responses it sees; at most ``_MAX_FOUND`` (paths come from requests)."""
NO_USAGE = NoUsage()
"""The one reader of responses that cannot hold usage (it keeps nothing)."""


def usage_reader(
    stream_format: str, path: str, status: int, content_type: str | None, content_encoding: str | None
) -> UsageReader:
    """The reader for one proxied response, chosen once its headers have arrived.

    ``stream_format`` is ``Provider.stream_format``; ``path`` as for ``dialect_for``; ``status``,
    ``content_type`` and ``content_encoding`` are the upstream's. Only 2xx answers with an
    ``text/event-stream`` or JSON body are read; anything else (errors, audio, images, an encoding
    other than gzip, deflate, br and zstd, several encodings stacked) gets a reader that does
    nothing and answers an empty ``Usage``. Never raises.
    """
    try:
        if not 200 <= status < 300 or not content_type:
            return NO_USAGE
        key = (stream_format, path, content_type, content_encoding)
        try:
            make = _MAKERS[key]
        except KeyError:
            make = _maker(stream_format, path, content_type, content_encoding)
            if len(_MAKERS) < _MAX_FOUND:
                _MAKERS[key] = make
        return NO_USAGE if make is None else make()
    except Exception:
        return NO_USAGE


def _maker(stream_format: str, path: str, content_type: str, content_encoding: str | None) -> Maker | None:
    """How to make the reader of the responses ``usage_reader`` describes; ``None``: they hold no usage."""
    dialect = dialect_for(stream_format, path)
    if dialect is None:
        return None
    mime = content_type.partition(";")[0].strip().lower()
    reader: type[StreamReader | BodyReader]
    if mime == "text/event-stream":
        reader = StreamReader
    elif mime == "application/json" or mime.endswith("+json"):
        reader = BodyReader
    else:
        return None
    encoding = (content_encoding or "").strip().lower()
    if not encoding or encoding == "identity":
        return partial(reader, dialect)
    if encoding in ENCODINGS:
        return lambda: DecodingReader(reader(dialect), encoding)
    return None
