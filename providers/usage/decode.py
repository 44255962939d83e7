"""Decompressing a copy of the body on the side, incrementally and in bounded pieces.

The relay passes the compressed bytes on unchanged; the reader needs the plain ones. Each chunk is
decompressed in pieces of at most about ``PIECE`` bytes, each handed to the inner reader before the
next is made, so a decompression bomb costs no memory; past ``MAX_OUTPUT`` decompressed bytes the
reader gives up (unknown usage), so it costs bounded time as well.
"""

from __future__ import annotations

import zlib
from typing import IO, Protocol, cast

import brotli  # type: ignore[import-untyped]
import zstandard

from providers.usage.model import Usage, UsageReader

PIECE = 64 * 1024
MAX_OUTPUT = 64 * 1024 * 1024
ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


class GiveUp(Exception):
    """More decompressed bytes than the reader is willing to look at."""


class _Sink:
    """Where decompressed pieces go: counted against the cap, then fed to the inner reader."""

    __slots__ = ("inner", "limit", "total")

    def __init__(self, inner: UsageReader, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.total = 0

    def write(self, piece: bytes) -> int:
        if piece:
            self.total += len(piece)
            if self.total > self.limit:
                raise GiveUp
            self.inner.feed(piece)
        return len(piece)


class _Decoder(Protocol):
    def push(self, data: bytes) -> None: ...


class _Zlib:
    """gzip (several members allowed; trailing garbage after a member ignored) and deflate (zlib
    wrapped as the standard says, or raw as some servers send it: told apart by the first two
    bytes)."""

    __slots__ = ("_d", "_done", "_gzip", "_members", "_sink", "_sniff")

    def __init__(self, sink: _Sink, gzip: bool) -> None:
        self._sink = sink
        self._gzip = gzip
        self._d: zlib._Decompress | None = zlib.decompressobj(31) if gzip else None
        self._sniff = b""
        self._members = 1
        self._done = False

    def push(self, data: bytes) -> None:
        if self._done:
            return
        if self._d is None:
            self._sniff += data
            if len(self._sniff) < 2:
                return
            data, self._sniff = self._sniff, b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._d = zlib.decompressobj(15 if wrapped else -15)
        while True:
            d = self._d
            try:
                self._drain(d, data)
            except zlib.error:
                if self._members == 1:
                    raise
                self._done = True  # not another gzip member: trailing bytes, ignored
                return
            if not d.eof:
                return
            if not self._gzip:
                self._done = True
                return
            data = d.unused_data
            self._d = zlib.decompressobj(31)
            self._members += 1
            if not data:
                return

    def _drain(self, d: zlib._Decompress, data: bytes) -> None:
        out = d.decompress(data, PIECE)
        self._sink.write(out)
        # a full piece may leave output pending inside zlib even when all input was taken
        while d.unconsumed_tail or len(out) == PIECE:
            tail = d.unconsumed_tail
            out = d.decompress(tail, PIECE)
            self._sink.write(out)
            if not out and d.unconsumed_tail == tail:
                break


class _Brotli:
    __slots__ = ("_d", "_sink")

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._d = brotli.Decompressor()

    def push(self, data: bytes) -> None:
        d = self._d
        if d.is_finished():
            return
        out = d.process(data, output_buffer_limit=PIECE)
        self._sink.write(out)
        # output may remain after the input is taken: drain until a call yields nothing
        while out:
            out = d.process(b"", output_buffer_limit=PIECE)
            self._sink.write(out)


class _Zstd:
    """zstandard's ``decompressobj`` returns all the output of a chunk at once, unbounded; its
    stream writer hands it to the sink ``write_size`` bytes at a time instead."""

    __slots__ = ("_writer",)

    def __init__(self, sink: _Sink) -> None:
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], sink), write_size=PIECE, closefd=False
        )

    def push(self, data: bytes) -> None:
        self._writer.write(data)


class DecodingReader:
    """Feeds the decompressed body to ``inner``. Corrupt data or too much of it: unknown usage."""

    __slots__ = ("_decoder", "_failed", "_inner")

    def __init__(self, inner: UsageReader, encoding: str, max_output: int = MAX_OUTPUT) -> None:
        self._inner = inner
        self._failed = False
        sink = _Sink(inner, max_output)
        self._decoder: _Decoder
        if encoding in ("gzip", "x-gzip"):
            self._decoder = _Zlib(sink, gzip=True)
        elif encoding == "deflate":
            self._decoder = _Zlib(sink, gzip=False)
        elif encoding == "br":
            self._decoder = _Brotli(sink)
        elif encoding == "zstd":
            self._decoder = _Zstd(sink)
        else:
            raise ValueError(f"unsupported content-encoding {encoding!r}")

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        try:
            self._decoder.push(chunk)
        except Exception:
            self._failed = True

    def result(self) -> Usage:
        if self._failed:
            return Usage()
        try:
            return self._inner.result()
        except Exception:
            return Usage()
