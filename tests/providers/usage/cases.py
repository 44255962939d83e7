"""The fixtures and what each must give: one response per file in ``fixtures/``, written from the
providers' published formats (compressed copies made from the plain ones)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from providers.usage import Usage

FIXTURES = Path(__file__).parent / "fixtures"
SSE = "text/event-stream"
JSON = "application/json"


@dataclass(frozen=True)
class Case:
    file: str
    stream_format: str
    path: str
    content_type: str
    expected: Usage
    encoding: str | None = None
    status: int = 200

    @property
    def body(self) -> bytes:
        return (FIXTURES / self.file).read_bytes()

    @property
    def stream(self) -> bool:
        return self.content_type == SSE

    def __str__(self) -> str:
        return self.file


def u(
    inp: int | None,
    out: int | None,
    model: str | None,
    *,
    cr: int | None = None,
    cw: int | None = None,
    reasoning: int | None = None,
) -> Usage:
    return Usage(inp, out, cr, cw, reasoning, model, found=True)


CHAT = "v1/chat/completions"
CASES = [
    # OpenAI chat completions: cache and reasoning tokens; a tool call streamed, usage in a last chunk
    # with "choices": [] (stream_options.include_usage), "usage": null in every other chunk
    Case("openai_chat_body.json", "openai-sse", CHAT, JSON, u(1117, 346, "o3-mini-2025-01-31", cr=1024, reasoning=320)),
    Case(
        "openai_chat_stream_tools.sse",
        "openai-sse",
        CHAT,
        SSE,
        u(2006, 19, "gpt-4o-2024-08-06", cr=1920, reasoning=0),
    ),
    # Azure: a first chunk with prompt filter results and "model": ""
    Case(
        "azure_openai_stream.sse",
        "openai-sse",
        "res/dep/chat/completions?api-version=2024-10-21",
        SSE,
        u(9, 2, "gpt-4o-mini-2024-07-18", cr=0, reasoning=0),
    ),
    # Groq: x_groq.usage in the last chunk
    Case("groq_stream.sse", "openai-sse", "openai/v1/chat/completions", SSE, u(44, 27, "llama-3.3-70b-versatile")),
    # top-level usage in the last chunk that has choices (DeepSeek, Mistral, OpenRouter with comments)
    Case(
        "deepseek_reasoner_stream.sse",
        "openai-sse",
        "chat/completions",
        SSE,
        u(1290, 420, "deepseek-reasoner", cr=1280, reasoning=395),
    ),
    Case("deepseek_body_cache_hit.json", "openai-sse", "chat/completions", JSON, u(1216, 10, "deepseek-chat", cr=1152)),
    Case("mistral_stream.sse", "openai-sse", CHAT, SSE, u(10, 4, "mistral-small-latest")),
    Case("openrouter_stream.sse", "openai-sse", CHAT, SSE, u(42, 210, "openai/o4-mini", cr=0, reasoning=192)),
    Case("perplexity_body.json", "openai-sse", CHAT, JSON, u(19, 6184 + 73997, "sonar-deep-research", reasoning=73997)),
    # Responses API
    Case(
        "openai_responses_body.json",
        "openai-sse",
        "v1/responses",
        JSON,
        u(328, 1052, "o3-2025-04-16", cr=256, reasoning=1024),
    ),
    Case(
        "openai_responses_stream.sse",
        "openai-sse",
        "v1/responses",
        SSE,
        u(37, 11, "gpt-4.1-2025-04-14", cr=0, reasoning=0),
    ),
    Case("openai_embeddings_body.json", "openai-sse", "v1/embeddings", JSON, u(5, 0, "text-embedding-3-small")),
    # Anthropic: input_tokens + cache writes + cache reads; message_delta's output_tokens is cumulative
    Case(
        "anthropic_body.json",
        "anthropic-sse",
        "v1/messages",
        JSON,
        u(21 + 188086, 393, "claude-sonnet-4-20250514", cr=0, cw=188086),
    ),
    Case(
        "anthropic_stream.sse",
        "anthropic-sse",
        "v1/messages",
        SSE,
        u(25 + 1800, 15, "claude-3-5-sonnet-20241022", cr=1800, cw=0),
    ),
    Case(
        "anthropic_stream_tools.sse",
        "anthropic-sse",
        "v1/messages",
        SSE,
        u(472 + 2048, 89, "claude-sonnet-4-5-20250929", cr=0, cw=2048),
    ),
    # a body larger than the window: usage cut out of its tail, the model out of its head
    Case(
        "anthropic_long_body.json",
        "anthropic-sse",
        "v1/messages",
        JSON,
        u(3 + 20480, 32000, "claude-opus-4-1-20250805", cr=20480, cw=0),
    ),
    Case("anthropic_error_body.json", "anthropic-sse", "v1/messages", JSON, Usage(), status=529),
    # Google AI Studio: output = candidates + thoughts; streams carry usage in every chunk, the last wins
    Case(
        "google_body.json",
        "google-sse",
        "v1beta/models/gemini-2.5-flash:generateContent",
        JSON,
        u(2101, 12 + 487, "gemini-2.5-flash", cr=2048, reasoning=487),
    ),
    Case(
        "google_stream.sse",
        "google-sse",
        "v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        SSE,
        u(8, 27, "gemini-2.0-flash"),
    ),
    Case(
        "google_stream_array.json",
        "google-sse",
        "v1beta/models/gemini-2.5-pro:streamGenerateContent",
        JSON,
        u(12, 5 + 234, "gemini-2.5-pro", reasoning=234),
    ),
    # Workers AI: native (no model named) and its OpenAI-compatible path
    Case("workers_ai_body.json", "workers-ai-sse", "@cf/meta/llama-3.1-8b-instruct", JSON, u(25, 10, None)),
    Case("workers_ai_stream.sse", "workers-ai-sse", "@cf/meta/llama-3.1-8b-instruct", SSE, u(25, 8, None)),
    Case(
        "workers_ai_v1_chat_body.json",
        "workers-ai-sse",
        CHAT,
        JSON,
        u(41, 4, "@cf/meta/llama-3.1-8b-instruct"),
    ),
    # Cohere v2: billed_units (what is billed) before tokens (the prompt template included); embed bills input only
    Case("cohere_body.json", "cohere-sse", "v2/chat", JSON, u(5, 418, None)),
    Case("cohere_stream.sse", "cohere-sse", "v2/chat", SSE, u(3, 2, None)),
    Case("cohere_embed_body.json", "cohere-sse", "v2/embed", JSON, u(1, 0, None)),
]

_PLAIN = {case.file: case for case in CASES}
COMPRESSED = [
    ("openai_chat_body.json.gz", "gzip"),
    ("openai_chat_stream_tools.sse.gz", "gzip"),
    ("anthropic_body.json.br", "br"),
    ("anthropic_stream.sse.br", "br"),
    ("google_body.json.zst", "zstd"),
    ("deepseek_body_cache_hit.json.deflate", "deflate"),
]
for _file, _encoding in COMPRESSED:
    _plain = _PLAIN[_file.rsplit(".", 1)[0]]
    CASES.append(
        Case(_file, _plain.stream_format, _plain.path, _plain.content_type, _plain.expected, encoding=_encoding)
    )
