"""The registry: provider slug → ``Provider``, from the built-in catalogue (``catalog.toml``), every
module of this package that defines ``PROVIDER``, and an optional operator file (``PROVIDERS_FILE``),
later entries overriding earlier ones. Adding a provider is adding one of those, nothing else."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import providers
from config import SettingsError
from providers.base import Provider, StreamFormat
from service.core.errors import Shape

CATALOG = Path(__file__).with_name("catalog.toml")
MACHINERY = frozenset(
    {
        "base",
        "cache_scope",
        "cuts",
        "headers",
        "mount",
        "paths",
        "prices",
        "registry",
        "relay",
        "upstream",
        "usage",
        "watch",
    }
)
RESERVED = frozenset({"tokens", "healthz", "readyz", "metrics", "openapi.json"})
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_FIELDS = {f.name for f in fields(Provider)} - {"slug"}
_TUPLES = {"strip_prefixes", "team_key_headers"}


def load_registry(extra: Path | None = None) -> dict[str, Provider]:
    registry = _from_toml(CATALOG)
    registry.update((p.slug, p) for p in provider_modules())
    if extra is not None:
        registry.update(_from_toml(extra, setting="PROVIDERS_FILE"))
    return registry


# Headers that carry a credential for some provider or proxy, whatever the provider called.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "cf-aig-authorization"}
)


@functools.lru_cache(maxsize=8)
def credential_headers(extra: Path | None = None) -> frozenset[str]:
    """Every header any registered provider takes a key in (``key_header``, ``team_key_headers``), with
    ``CREDENTIAL_HEADERS``: none of them is ever forwarded from a client, whichever provider it calls."""
    names = set(CREDENTIAL_HEADERS)
    for provider in load_registry(extra).values():
        names.add(provider.key_header)
        names.update(provider.team_key_headers)
    return frozenset(names)


def provider_modules() -> list[Provider]:
    """The ``PROVIDER`` of every module in this package (``workers_ai.py``, ``azure_openai.py``, …)."""
    found = []
    for module in pkgutil.iter_modules(providers.__path__):
        if module.name in MACHINERY:
            continue
        provider = getattr(importlib.import_module(f"providers.{module.name}"), "PROVIDER", None)
        if isinstance(provider, Provider):
            found.append(provider)
    return found


def _from_toml(path: Path, setting: str | None = None) -> dict[str, Provider]:
    where = f"{setting} ({path})" if setting else str(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{where} cannot be read as TOML: {exc}") from exc
    providers = {}
    for slug, entry in data.items():
        providers[slug] = provider_from_entry(slug, entry, where)
    return providers


def provider_from_entry(slug: str, entry: Any, where: str) -> Provider:
    if not _SLUG.fullmatch(slug) or slug in RESERVED:
        raise SettingsError(f"{where}: {slug!r} is not a usable provider slug (lower case, digits and '-')")
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: [{slug}] must be a table")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise SettingsError(f"{where}: [{slug}] has unknown keys: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _TUPLES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SettingsError(f"{where}: [{slug}] {key} must be a list of strings")
            values[key] = tuple(v.lower() if key == "team_key_headers" else v for v in value)
        elif key == "gateway_token_as_key":
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: [{slug}] {key} must be true or false")
            values[key] = value
        elif not isinstance(value, str):
            raise SettingsError(f"{where}: [{slug}] {key} must be a string")
        else:
            values[key] = value.lower() if key == "key_header" else value
    if values.get("error_shape", "openai") not in get_args(Shape):
        raise SettingsError(f"{where}: [{slug}] error_shape must be one of {', '.join(get_args(Shape))}")
    if values.get("stream_format", "openai-sse") not in get_args(StreamFormat):
        raise SettingsError(f"{where}: [{slug}] stream_format must be one of {', '.join(get_args(StreamFormat))}")
    return Provider(slug=slug, **values)
