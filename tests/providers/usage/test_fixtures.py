"""Every fixture gives its exact usage, however its bytes are cut into chunks, and a stream cut
short gives what had arrived."""

from __future__ import annotations

import gzip
import itertools
import zlib

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.usage import Usage, usage_reader
from tests.providers.usage.cases import CASES, COMPRESSED, FIXTURES, Case

ALL = pytest.mark.parametrize("case", CASES, ids=str)
PROPERTY = settings(
    derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def read(case: Case, chunks: list[bytes]) -> Usage:
    reader = usage_reader(case.stream_format, case.path, case.status, case.content_type, case.encoding)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.result()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


@ALL
def test_whole_body(case: Case) -> None:
    assert read(case, [case.body]) == case.expected


@ALL
def test_one_byte_chunks(case: Case) -> None:
    body = case.body
    assert read(case, [body[i : i + 1] for i in range(len(body))]) == case.expected


@ALL
@PROPERTY
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40))
def test_any_chunking(case: Case, cuts: list[int]) -> None:
    assert read(case, split(case.body, cuts)) == case.expected


@ALL
@PROPERTY
@given(data=st.data())
def test_cut_short(case: Case, data: st.DataObject) -> None:
    """A body truncated anywhere, in any chunks: no exception, and only figures that were sent."""
    body = case.body
    end = data.draw(st.integers(min_value=0, max_value=len(body)), label="end")
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=8), label="cuts")
    got = read(case, split(body[:end], cuts))
    for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
        value = getattr(got, name)
        assert value is None or (isinstance(value, int) and value >= 0)
    assert got.model in (None, case.expected.model)
    assert got.found == any(
        getattr(got, n) is not None
        for n in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
    )
    if end == len(body):
        assert got == case.expected


def _complete_after(case: Case) -> int:
    """Where a plain event stream has sent everything its usage comes from: past the blank line
    that ends the last event naming usage (or the model)."""
    body = case.body
    last = max(body.rfind(b'"usage'), body.rfind(b'"model'))
    ends = [i for i in (body.find(b"\n\n", last), body.find(b"\r\n\r\n", last)) if i >= 0]
    return min(ends) + 2


STREAMS = [case for case in CASES if case.stream and case.encoding is None]


@pytest.mark.parametrize("case", STREAMS, ids=str)
def test_stream_cut_after_the_usage_gives_it_all(case: Case) -> None:
    body = case.body
    for end in range(_complete_after(case), len(body) + 1):
        assert read(case, [body[:end]]) == case.expected, end


@pytest.mark.parametrize("case", STREAMS, ids=str)
def test_crlf_streams_read_alike(case: Case) -> None:
    body = case.body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert read(case, [body[i : i + 7] for i in range(0, len(body), 7)]) == case.expected


@pytest.mark.parametrize("case", STREAMS, ids=str)
def test_stream_without_the_last_blank_line(case: Case) -> None:
    body = case.body.rstrip(b"\r\n").removesuffix(b"data: [DONE]").rstrip(b"\r\n")
    assert read(case, [body]) == case.expected


@pytest.mark.parametrize(("file", "encoding"), COMPRESSED)
def test_compressed_fixtures_hold_the_plain_ones(file: str, encoding: str) -> None:
    data = (FIXTURES / file).read_bytes()
    decompress = {
        "gzip": gzip.decompress,
        "deflate": zlib.decompress,
        "br": brotli.decompress,
        "zstd": zstandard.ZstdDecompressor().decompress,
    }[encoding]
    assert decompress(data) == (FIXTURES / file.rsplit(".", 1)[0]).read_bytes()
