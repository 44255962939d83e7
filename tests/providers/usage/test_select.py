"""Which reader a response gets."""

from __future__ import annotations

import pytest

from providers.usage import NoUsage, Usage, dialect_for, usage_reader
from providers.usage.decode import DecodingReader
from providers.usage.readers import BodyReader, StreamReader

BODY = b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}'


@pytest.mark.parametrize(
    ("status", "content_type", "encoding"),
    [
        (400, "application/json", None),
        (429, "application/json", None),
        (500, "text/event-stream", None),
        (304, "application/json", None),
        (200, None, None),
        (200, "", None),
        (200, "audio/mpeg", None),
        (200, "image/png", None),
        (200, "text/plain", None),
        (200, "application/json", "compress"),
        (200, "application/json", "gzip, br"),
    ],
)
def test_responses_that_cannot_hold_usage_get_the_no_op_reader(
    status: int, content_type: str | None, encoding: str | None
) -> None:
    reader = usage_reader("openai-sse", "v1/chat/completions", status, content_type, encoding)
    assert isinstance(reader, NoUsage)
    reader.feed(BODY)
    assert reader.result() == Usage()


def test_an_unknown_stream_format_reads_nothing() -> None:
    assert isinstance(usage_reader("smoke-signals", "v1/chat/completions", 200, "application/json", None), NoUsage)


@pytest.mark.parametrize(
    ("content_type", "encoding", "kind"),
    [
        ("text/event-stream", None, StreamReader),
        ("text/event-stream; charset=utf-8", "identity", StreamReader),
        ("application/json", None, BodyReader),
        ("Application/JSON; charset=UTF-8", "", BodyReader),
        ("application/problem+json", None, BodyReader),
        ("application/json", "gzip", DecodingReader),
        ("text/event-stream", "BR", DecodingReader),
        ("application/json", "zstd", DecodingReader),
        ("application/json", "deflate", DecodingReader),
        ("application/json", "x-gzip", DecodingReader),
    ],
)
def test_reader_by_content_type_and_encoding(content_type: str, encoding: str | None, kind: type) -> None:
    assert isinstance(usage_reader("openai-sse", "v1/chat/completions", 200, content_type, encoding), kind)


@pytest.mark.parametrize(
    ("stream_format", "path", "dialect"),
    [
        ("openai-sse", "v1/chat/completions", "openai"),
        ("openai-sse", "/v1/responses?stream=true", "openai"),
        ("workers-ai-sse", "@cf/meta/llama-3.1-8b-instruct", "workers-ai"),
        ("workers-ai-sse", "/workers-ai/@hf/thebloke/zephyr-7b-beta-awq", "workers-ai"),
        ("workers-ai-sse", "v1/chat/completions", "openai"),
        ("workers-ai-sse", "v1/responses", "openai"),
        ("anthropic-sse", "v1/messages", "anthropic"),
        ("anthropic-sse", "v1/chat/completions", "openai"),
        ("google-sse", "v1beta/models/gemini-2.0-flash:generateContent", "google"),
        ("google-sse", "v1beta/openai/chat/completions", "openai"),
        ("cohere-sse", "v2/chat", "cohere"),
        ("cohere-sse", "compatibility/v1/chat/completions", "openai"),
    ],
)
def test_dialect_by_format_and_path(stream_format: str, path: str, dialect: str) -> None:
    found = dialect_for(stream_format, path)
    assert found is not None and found.name == dialect


def test_embeddings_report_no_output() -> None:
    assert dialect_for("openai-sse", "v1/embeddings").embeddings  # type: ignore[union-attr]
    assert dialect_for("google-sse", "v1beta/openai/embeddings").embeddings  # type: ignore[union-attr]
    assert not dialect_for("openai-sse", "v1/chat/completions").embeddings  # type: ignore[union-attr]


def test_result_twice_gives_the_same() -> None:
    reader = usage_reader("openai-sse", "v1/chat/completions", 200, "text/event-stream", None)
    reader.feed(b"data: " + BODY + b"\n\ndata: [DONE]\n\n")
    first = reader.result()
    assert first == reader.result() == Usage(3, 4, None, None, None, "m", True)


def test_multi_line_data_is_joined() -> None:
    reader = usage_reader("openai-sse", "v1/chat/completions", 200, "text/event-stream", None)
    reader.feed(b'data: {"model":"m",\ndata: "usage":{"prompt_tokens":3,\ndata: "completion_tokens":4}}\n\n')
    assert reader.result() == Usage(3, 4, None, None, None, "m", True)


def test_anthropic_output_tokens_are_cumulative_never_summed() -> None:
    reader = usage_reader("anthropic-sse", "v1/messages", 200, "text/event-stream", None)
    reader.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude","usage":'
        b'{"input_tokens":10,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":12}}\n\n'
    )
    assert reader.result() == Usage(10, 12, None, None, None, "claude", True)


def test_cohere_falls_back_to_the_tokens_seen_without_billed_units() -> None:
    reader = usage_reader("cohere-sse", "v2/chat", 200, "application/json", None)
    reader.feed(b'{"id":"x","usage":{"tokens":{"input_tokens":70,"output_tokens":9}}}')
    assert reader.result() == Usage(70, 9, None, None, None, None, True)


@pytest.mark.parametrize("figure", [b"100000000000000000000", b"10000000001", b"1e30", b"-1"])
def test_a_count_out_of_range_is_not_a_count(figure: bytes) -> None:
    # beyond any context window: not understood, so nothing downstream adds up past 64 bits
    reader = usage_reader("openai-sse", "v1/chat/completions", 200, "application/json", None)
    reader.feed(b'{"model":"m","usage":{"prompt_tokens":%s,"completion_tokens":%s}}' % (figure, figure))
    assert reader.result() == Usage(None, None, None, None, None, "m", False)
