"""Allow-lists: which models and providers a key (and its team) may call.

A list is a tuple of patterns: model patterns are globs in which ``*`` stands for any run of
characters and ``?`` for one (``gpt-4o*``, ``claude-3-5-*``, ``@cf/meta/*``), everything else literal
and case-sensitive; provider patterns are slugs (``openai``). A key may carry both lists, and so may
its team: a request must pass every list there is (the key's and the team's). ``None`` is no list.

``Access`` is the compiled form the request path holds (on the cached ``Team``): keys without any
list have none, so the request path pays one attribute read for them.

Matching is a linear-time wildcard walk (no regular expressions built from patterns, so no pattern
can make matching slow), over a model name of at most ``MAX_MODEL_CHARS``. A list is compiled once per
``Access`` (``ModelPatterns``): its literal names are a set, its patterns whose one wildcard is a final
``*`` (``gpt-4o*``, as most are) one ``str.startswith``, and only the rest are walked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 256
MAX_MODEL_CHARS = 512
_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
COMPAT = "compat"
"""Cloudflare's unified endpoint: models are ``{provider}/{model}``."""


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern`` (``*`` any run, ``?`` one character), in O(len * len)
    at worst: on a mismatch after a ``*``, only the last ``*`` is retried one character further."""
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def check_patterns(value: object, field: str) -> tuple[str, ...] | None:
    """A model allow-list as the API takes it: ``null`` or a list of at most ``MAX_PATTERNS``
    non-empty printable strings; an empty list is no list. ``ValueError`` naming ``field`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a list of strings or null.")
    if len(value) > MAX_PATTERNS:
        raise ValueError(f"'{field}' must have at most {MAX_PATTERNS} entries.")
    patterns: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or not item.isprintable():
            raise ValueError(f"'{field}' entries must be non-empty strings of printable characters.")
        if len(item) > MAX_PATTERN_CHARS:
            raise ValueError(f"'{field}' entries must be at most {MAX_PATTERN_CHARS} characters.")
        if item not in patterns:
            patterns.append(item)
    return tuple(patterns) or None


def check_providers(value: object, field: str, known: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """A provider allow-list: ``null`` or a list of slugs (of ``known`` ones, when given); an
    empty list is no list. ``ValueError`` naming ``field`` (and the unknown slug) otherwise."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a list of provider slugs or null.")
    if len(value) > MAX_PATTERNS:
        raise ValueError(f"'{field}' must have at most {MAX_PATTERNS} entries.")
    slugs: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _SLUG.fullmatch(item):
            raise ValueError(f"'{field}' entries must be provider slugs such as 'openai'.")
        if known is not None and item not in known:
            raise ValueError(f"'{field}': unknown provider '{item}' (known: {', '.join(known)}).")
        if item not in slugs:
            slugs.append(item)
    return tuple(slugs) or None


class ModelPatterns(NamedTuple):
    """A model allow-list compiled for matching (``compile_patterns``)."""

    exact: frozenset[str]
    """The patterns without a wildcard."""
    prefixes: tuple[str, ...]
    """The patterns whose only wildcard is a final ``*``, without it."""
    others: tuple[str, ...]
    """The rest, walked by ``glob_match``."""

    def match(self, name: str) -> bool:
        if name in self.exact or name.startswith(self.prefixes):
            return True
        return bool(self.others) and any(glob_match(pattern, name) for pattern in self.others)


def compile_patterns(patterns: Iterable[str]) -> ModelPatterns:
    exact: set[str] = set()
    prefixes: list[str] = []
    others: list[str] = []
    for pattern in patterns:
        stars = pattern.count("*")
        if "?" in pattern or stars > 1 or (stars == 1 and not pattern.endswith("*")):
            others.append(pattern)
        elif stars:
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    return ModelPatterns(frozenset(exact), tuple(prefixes), tuple(others))


@dataclass(frozen=True, slots=True)
class Access:
    """The allow-lists that apply to one key: its own and its team's (each ``None`` when absent)."""

    key_models: tuple[str, ...] | None = None
    key_providers: tuple[str, ...] | None = None
    team_models: tuple[str, ...] | None = None
    team_providers: tuple[str, ...] | None = None
    _key_patterns: ModelPatterns | None = field(default=None, init=False, repr=False, compare=False)
    _team_patterns: ModelPatterns | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.key_models is not None:
            object.__setattr__(self, "_key_patterns", compile_patterns(self.key_models))
        if self.team_models is not None:
            object.__setattr__(self, "_team_patterns", compile_patterns(self.team_models))

    @property
    def limits_models(self) -> bool:
        return self.key_models is not None or self.team_models is not None

    def provider_refusal(self, provider: str, model: str | None = None) -> str | None:
        """Why ``provider`` is refused (``None``: allowed). Through ``compat`` the provider is also
        the model's own prefix (``openai/gpt-4o`` is OpenAI's), and either may be listed."""
        prefix = model.partition("/")[0] if provider == COMPAT and model is not None and "/" in model else None
        for whose, allowed in (("key", self.key_providers), ("team", self.team_providers)):
            if allowed is not None and provider not in allowed and (prefix is None or prefix not in allowed):
                shown = provider if prefix is None else prefix
                return f"This {whose}'s allow-list does not include the provider '{shown}'."
        return None

    def model_refusal(self, provider: str, model: str) -> str | None:
        """Why ``model`` is refused (``None``: allowed). Through ``compat`` a pattern may name the
        whole ``provider/model`` or the model alone (``gpt-4o*`` allows ``openai/gpt-4o-mini``)."""
        bare = model.partition("/")[2] if provider == COMPAT and "/" in model else None
        for whose, patterns in (("key", self._key_patterns), ("team", self._team_patterns)):
            if patterns is not None and not (patterns.match(model) or (bare is not None and patterns.match(bare))):
                return f"This {whose} does not allow the model '{shown_model(model)}'."
        return None


def shown_model(model: str) -> str:
    """A model name as an error message may show it: at most 100 characters."""
    return model if len(model) <= 100 else model[:100] + "…"


def access_for(
    key_models: tuple[str, ...] | None,
    key_providers: tuple[str, ...] | None,
    team_models: tuple[str, ...] | None,
    team_providers: tuple[str, ...] | None,
) -> Access | None:
    """The compiled allow-lists of a key, or ``None`` when neither it nor its team has any."""
    if key_models is None and key_providers is None and team_models is None and team_providers is None:
        return None
    return Access(key_models, key_providers, team_models, team_providers)
