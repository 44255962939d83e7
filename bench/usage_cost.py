"""What reading usage on the side costs per chunk: a typical 40-chunk OpenAI chat stream (one event
per chunk, ``"usage":null`` in each as ``stream_options.include_usage`` makes it, usage in the last),
fed to a fresh reader again and again. Prints microseconds per chunk; not asserted anywhere.

    .venv/bin/python -m bench.usage_cost
"""

from __future__ import annotations

import gzip
import time

import orjson

from providers.usage import usage_reader

ROUNDS = 2000


def openai_stream() -> list[bytes]:
    base = {
        "id": "chatcmpl-AyPNinnUqUDYo9SAdA52NobMflmj2",
        "object": "chat.completion.chunk",
        "created": 1738960610,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_4691090a87",
    }
    events = []
    for i in range(38):
        delta = {"content": f" word{i}"} if i else {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        events.append({**base, "choices": [choice], "usage": None})
    stop = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    events.append({**base, "choices": [stop], "usage": None})
    usage = {"prompt_tokens": 2006, "completion_tokens": 39, "total_tokens": 2045}
    events.append({**base, "choices": [], "usage": usage})
    chunks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    chunks[-1] += b"data: [DONE]\n\n"
    return chunks


def per_chunk(chunks: list[bytes], encoding: str | None) -> float:
    """Seconds per chunk, reader creation and result() included."""
    started = time.perf_counter()
    for _ in range(ROUNDS):
        reader = usage_reader("openai-sse", "v1/chat/completions", 200, "text/event-stream", encoding)
        for chunk in chunks:
            reader.feed(chunk)
        reader.result()
    return (time.perf_counter() - started) / (ROUNDS * len(chunks))


def main() -> None:
    chunks = openai_stream()
    whole = b"".join(chunks)
    compressed = gzip.compress(whole)
    step = -(-len(compressed) // len(chunks))
    gz_chunks = [compressed[i : i + step] for i in range(0, len(compressed), step)]
    split = [whole[i : i + 97] for i in range(0, len(whole), 97)]
    print(f"{len(chunks)} chunks, {len(whole)} bytes, median chunk {sorted(map(len, chunks))[len(chunks) // 2]} bytes")
    for label, feed, encoding in (
        ("plain, one event per chunk", chunks, None),
        ("plain, 97-byte chunks across events", split, None),
        ("gzip, 40 chunks", gz_chunks, "gzip"),
    ):
        per_chunk(feed, encoding)  # warm up
        seconds = min(per_chunk(feed, encoding) for _ in range(3))
        print(f"{label:40} {seconds * 1e6:6.2f} µs per chunk ({len(feed)} chunks)")


if __name__ == "__main__":
    main()
