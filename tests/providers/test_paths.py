"""Path checks: nothing climbs out of the provider's base."""

from __future__ import annotations

import pytest

from providers.paths import safe_rest
from providers.registry import load_registry
from service.core.errors import BadRequest


@pytest.mark.parametrize(
    ("raw", "rest"),
    [
        (b"/v1/chat/completions", "v1/chat/completions"),
        (b"", ""),
        (b"/", ""),
        (b"//v1//messages", "v1/messages"),
        (b"/@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.1-8b-instruct"),
        (b"/models/gpt%204", "models/gpt%204"),
        (b"/v1/files/", "v1/files/"),
        (b"/a/.well-known", "a/.well-known"),
    ],
)
def test_accepted_paths(raw: bytes, rest: str) -> None:
    assert safe_rest(raw) == rest


@pytest.mark.parametrize(
    "raw",
    [
        b"/..",
        b"/v1/../x",
        b"/%2e%2e/x",
        b"/%2E%2e",
        b"/.",
        b"/v1%2fx",
        b"/v1%2Fx",
        b"/a%5cb",
        b"/a\\b",
        b"/a%00",
        b"/\xc3\xa9",
    ],
)
def test_refused_paths(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        safe_rest(raw)


def test_sdk_prefixes_are_dropped_where_the_upstream_does_not_want_them() -> None:
    registry = load_registry()
    assert registry["openai"].rest_path("v1/chat/completions") == "chat/completions"
    assert registry["openai"].rest_path("v1") == ""
    assert registry["openai"].rest_path("v10/x") == "v10/x"
    assert registry["groq"].rest_path("openai/v1/chat/completions") == "chat/completions"
    assert registry["groq"].rest_path("v1/chat/completions") == "chat/completions"
    assert registry["anthropic"].rest_path("v1/messages") == "v1/messages"
    assert registry["mistral"].rest_path("v1/chat/completions") == "v1/chat/completions"
    assert registry["workers-ai"].rest_path("v1/chat/completions") == "v1/chat/completions"
    assert registry["workers-ai"].shape_for("v1/chat/completions") == "openai"
    assert registry["workers-ai"].shape_for("@cf/meta/llama") == "cloudflare"
