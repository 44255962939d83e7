"""Glob matching, the allow-lists' rules and the strict reading of a body's model, in process."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.allow_lists import Ambiguous, body_model
from service.core.access import Access, access_for, check_patterns, check_providers, compile_patterns, glob_match


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("gpt-4o*", "gpt-4o-mini", True),
        ("gpt-4o*", "gpt-4o", True),
        ("gpt-4o*", "o1", False),
        ("gpt-4o*", "xgpt-4o", False),
        ("claude-3-5-*", "claude-3-5-sonnet-latest", True),
        ("@cf/meta/*", "@cf/meta/llama-3.1-8b-instruct", True),
        ("@cf/meta/*", "@cf/mistral/x", False),
        ("gpt-?o", "gpt-4o", True),
        ("*-mini", "gpt-4o-mini", True),
        ("a*b*c", "abxxbxxc", True),
        ("a*b*c", "abxxbxxd", False),
        ("GPT-4o", "gpt-4o", False),
        ("[a]", "a", False),
        ("*", "", True),
        ("", "", True),
    ],
)
def test_glob_match(pattern: str, text: str, matches: bool) -> None:
    assert glob_match(pattern, text) is matches


@given(st.text("ab*?", max_size=8), st.text("abc", max_size=10))
def test_glob_match_agrees_with_fnmatch_on_stars_and_question_marks(pattern: str, text: str) -> None:
    assert glob_match(pattern, text) is fnmatch.fnmatchcase(text, pattern)


@given(st.lists(st.text("ab*?", max_size=6), min_size=1, max_size=4), st.text("abc", max_size=8))
def test_a_compiled_list_matches_as_walking_each_pattern_does(patterns: list[str], name: str) -> None:
    """Literal names as a set, ``prefix*`` as ``startswith``, the rest walked: the same answers."""
    assert compile_patterns(patterns).match(name) is any(glob_match(pattern, name) for pattern in patterns)


def test_a_pathological_pattern_is_fast() -> None:
    assert not glob_match("*a" * 100 + "b", "a" * 512)  # linear walk: no backtracking blow-up


def test_lists_are_checked() -> None:
    assert check_patterns(None, "f") is None and check_patterns([], "f") is None
    assert check_patterns(["a", "a", "b"], "f") == ("a", "b")
    for bad in ("a", [1], [" "], ["x" * 257], ["\n"], ["x"] * 101):
        with pytest.raises(ValueError, match="'f'"):
            check_patterns(bad, "f")
    assert check_providers(["openai", "openai"], "p", ("openai",)) == ("openai",)
    for bad in ("openai", ["Open AI"], ["nope"], ["x"] * 101):
        with pytest.raises(ValueError, match="'p'"):
            check_providers(bad, "p", ("openai",))
    assert access_for(None, None, None, None) is None


def test_both_lists_apply_and_compat_names_the_provider() -> None:
    access = Access(("gpt-4o*",), ("openai", "compat"), ("gpt-*",), None)
    assert access.model_refusal("openai", "gpt-4o-mini") is None
    assert "key" in (access.model_refusal("openai", "gpt-5") or "")
    assert access.model_refusal("compat", "openai/gpt-4o") is None
    assert access.provider_refusal("compat", "anthropic/claude") is None  # compat itself is listed
    only_openai = Access(None, ("openai",), None, ("openai", "anthropic"))
    assert only_openai.provider_refusal("compat", "openai/gpt-4o") is None
    assert "'anthropic'" in (only_openai.provider_refusal("compat", "anthropic/claude") or "")
    assert "'groq'" in (only_openai.provider_refusal("groq") or "")
    team = Access(None, None, ("gpt-*",), ("openai",))
    assert "team" in (team.model_refusal("openai", "o1") or "")
    assert "team" in (team.provider_refusal("anthropic") or "")
    assert access.model_refusal("openai", "x" * 200) is not None
    assert "…" in (access.model_refusal("openai", "y" * 200) or "")


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "gpt-4o"}', "gpt-4o"),
        (b'{"model": "g\\u0070t-4o", "model_x": 1}', "gpt-4o"),
        (b'{"messages": [{"model": "o1"}], "model": "gpt-4o"}', "gpt-4o"),
        ('{"model": "gpt-4o", "text": "é"}'.encode(), "gpt-4o"),
    ],
)
def test_body_model(body: bytes, model: str) -> None:
    assert body_model(body) == model


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "model": "b"}',
        b'{"model": "a", "mod\\u0065l": "b"}',
        b'{"x": {"k": 1, "k": 2}, "model": "a"}',
        b'{"model": null}',
        b'{"model": 1}',
        b'"gpt-4o"',
        b'{"model": "a", "n": Infinity}',
        b"\xef\xbb\xbf{}",
        '{"model": "a"}'.encode("utf-16"),
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_ambiguous_bodies(body: bytes) -> None:
    with pytest.raises(Ambiguous):
        body_model(body)
