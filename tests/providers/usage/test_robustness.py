"""Whatever arrives, a reader never raises, stays bounded in memory, and says so when it gave up."""

from __future__ import annotations

import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.usage import Usage, usage_reader
from providers.usage.decode import MAX_OUTPUT
from tests.providers.usage.cases import CASES, JSON, SSE

FORMATS = ["openai-sse", "anthropic-sse", "google-sse", "cohere-sse", "workers-ai-sse"]
ENCODINGS = [None, "gzip", "deflate", "br", "zstd"]
MiB = 1024 * 1024
PEAK_LIMIT = 4 * MiB


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    stream_format=st.sampled_from(FORMATS),
    content_type=st.sampled_from([SSE, JSON]),
    encoding=st.sampled_from(ENCODINGS),
    chunks=st.lists(st.binary(max_size=300), max_size=20),
)
def test_garbage_never_raises(stream_format: str, content_type: str, encoding: str | None, chunks: list[bytes]) -> None:
    reader = usage_reader(stream_format, "v1/chat/completions", 200, content_type, encoding)
    for chunk in chunks:
        reader.feed(chunk)
    assert isinstance(reader.result(), Usage)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    case=st.sampled_from([c for c in CASES if c.encoding is None]),
    position=st.integers(min_value=0, max_value=1 << 16),
    noise=st.binary(min_size=1, max_size=40),
)
def test_fixtures_with_bytes_flipped_never_raise(case: object, position: int, noise: bytes) -> None:
    from tests.providers.usage.cases import Case

    assert isinstance(case, Case)
    body = case.body
    at = position % (len(body) + 1)
    damaged = body[:at] + noise + body[at + len(noise) :]
    reader = usage_reader(case.stream_format, case.path, case.status, case.content_type, case.encoding)
    for i in range(0, len(damaged), 13):
        reader.feed(damaged[i : i + 13])
    got = reader.result()
    assert got.model is None or isinstance(got.model, str)


def _peak(feed: Callable[[], Usage]) -> tuple[Usage, int]:
    tracemalloc.start()
    try:
        usage = feed()
        return usage, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _run(stream_format: str, content_type: str, encoding: str | None, pieces: Iterator[bytes]) -> Usage:
    reader = usage_reader(stream_format, "v1/chat/completions", 200, content_type, encoding)
    for piece in pieces:
        reader.feed(piece)
    return reader.result()


@pytest.mark.parametrize("content_type", [SSE, JSON])
def test_a_huge_single_line_stays_bounded(content_type: str) -> None:
    """32 MiB without a line end (then a usage event the reader may or may not still see)."""
    block = b'{"usage":{"prompt_tokens":1' + b"a" * (64 * 1024)

    def pieces() -> Iterator[bytes]:
        for _ in range(512):
            yield block

    usage, peak = _peak(lambda: _run("openai-sse", content_type, None, pieces()))
    assert peak < PEAK_LIMIT
    assert usage == Usage()


def test_an_oversized_event_still_gives_its_usage() -> None:
    """A Responses API response.completed event repeating megabytes of output (an image, say): not
    kept whole, its usage cut out of its tail."""
    image = b"A" * (3 * MiB)
    event = (
        b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","model":"gpt-5",'
        b'"output":[{"type":"image_generation_call","result":"' + image + b'"}],"usage":{"input_tokens":12,'
        b'"input_tokens_details":{"cached_tokens":0},"output_tokens":1590,'
        b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":1602}}}\n\n'
    )

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(event), 16 * 1024):
            yield event[i : i + 16 * 1024]

    usage, peak = _peak(lambda: _run("openai-sse", SSE, None, pieces()))
    assert usage == Usage(12, 1590, 0, None, 0, None, True)
    assert peak < PEAK_LIMIT


def _compressed(encoding: str, size: int) -> bytes:
    """``size`` zero bytes compressed by a streaming compressor, a MiB at a time."""
    zeros = bytes(MiB)
    parts: list[bytes] = []
    if encoding in ("gzip", "deflate"):
        z = zlib.compressobj(1, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
        parts = [z.compress(zeros) for _ in range(size // MiB)]
        parts.append(z.flush())
    elif encoding == "br":
        b = brotli.Compressor(quality=1)
        parts = [b.process(zeros) for _ in range(size // MiB)]
        parts.append(b.finish())
    else:
        c = zstandard.ZstdCompressor(level=3).compressobj()
        parts = [c.compress(zeros) for _ in range(size // MiB)]
        parts.append(c.flush())
    return b"".join(parts)


@pytest.mark.parametrize("content_type", [SSE, JSON])
@pytest.mark.parametrize(("encoding", "size"), [("gzip", 1024 * MiB), ("br", 1024 * MiB), ("zstd", 1024 * MiB)])
def test_a_decompression_bomb_costs_no_memory(encoding: str, size: int, content_type: str) -> None:
    bomb = _compressed(encoding, size)

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(bomb), 64 * 1024):
            yield bomb[i : i + 64 * 1024]

    started = time.perf_counter()
    usage, peak = _peak(lambda: _run("openai-sse", content_type, encoding, pieces()))
    assert usage == Usage()  # gave up past MAX_OUTPUT: unknown
    assert peak < PEAK_LIMIT
    assert size > MAX_OUTPUT
    assert time.perf_counter() - started < 30


def test_corrupt_compressed_data_gives_unknown_usage() -> None:
    case = next(c for c in CASES if c.file == "openai_chat_body.json.gz")
    body = case.body
    damaged = body[:20] + b"\xff" * 30 + body[50:]
    reader = usage_reader(case.stream_format, case.path, 200, case.content_type, "gzip")
    reader.feed(damaged)
    assert reader.result() == Usage()


def test_trailing_bytes_after_a_gzip_member_are_ignored() -> None:
    case = next(c for c in CASES if c.file == "openai_chat_body.json.gz")
    reader = usage_reader(case.stream_format, case.path, 200, case.content_type, "gzip")
    reader.feed(case.body + b"\x00\x00garbage")
    assert reader.result() == case.expected


def test_raw_deflate_is_read_too() -> None:
    case = next(c for c in CASES if c.file == "deepseek_body_cache_hit.json")
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = z.compress(case.body) + z.flush()
    reader = usage_reader(case.stream_format, case.path, 200, case.content_type, "deflate")
    for i in range(len(raw)):
        reader.feed(raw[i : i + 1])
    assert reader.result() == case.expected
