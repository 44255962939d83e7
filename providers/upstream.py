"""Where a provider's requests go, decided once at start-up from the settings.

Through Cloudflare AI Gateway (``AI_GATEWAY_URL`` set): ``{AI_GATEWAY_URL}/{slug}/…`` with
``cf-aig-authorization`` and, where set, the provider key. Direct (no ``AI_GATEWAY_URL``): the
provider's ``{SLUG}_BASE_URL`` or public API with its ``{SLUG}_API_KEY``, and no ``cf-aig-*``
header leaves the gateway. A provider that can be neither answers 503 naming what to set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from config import Settings, SettingsError
from config.settings import env_name, http_url
from providers.base import Provider
from providers.registry import load_registry

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Upstream:
    provider: Provider
    base: str
    """``AI_GATEWAY_URL`` through Cloudflare, the provider's API base direct."""
    via_gateway: bool
    headers: tuple[tuple[str, str], ...]
    """Added to every request: the gateway token and the provider key, as configured."""

    def url(self, rest: str) -> str:
        if self.via_gateway:
            return self.provider.gateway_url(self.base, rest)
        return self.provider.direct_url(self.base, rest)


def _header_value(setting: str, value: str) -> str:
    """A setting's value as a request header's: one line, no control character (it would split the
    request the relay writes)."""
    if _CONTROL.search(value):
        raise SettingsError(f"{setting} holds a control character (a line break?); a header value cannot")
    return value


def resolve(provider: Provider, settings: Settings) -> Upstream | str:
    """The upstream for ``provider``, or the message a 503 gives when there is none."""
    key_name = env_name(provider.slug, "API_KEY")
    key = settings.provider_env.get(key_name)
    base_name = env_name(provider.slug, "BASE_URL")
    raw_base = settings.provider_env.get(base_name)
    base = http_url(base_name, raw_base) if raw_base else None
    key_header = [(provider.key_header, provider.key_prefix + _header_value(key_name, key))] if key else []

    if settings.ai_gateway_url:
        headers = []
        if settings.ai_gateway_token:
            token = _header_value("AI_GATEWAY_TOKEN", settings.ai_gateway_token)
            headers.append(("cf-aig-authorization", f"Bearer {token}"))
            if not key and provider.gateway_token_as_key:
                key_header = [(provider.key_header, provider.key_prefix + settings.ai_gateway_token)]
        return Upstream(provider, settings.ai_gateway_url, True, (*headers, *key_header))

    base = base or provider.default_direct_base(settings)
    if base is None:
        needs = "CF_ACCOUNT_ID or " + base_name if "{CF_ACCOUNT_ID}" in (provider.direct_base_url or "") else base_name
        if provider.direct_base_url is None and not raw_base:
            return f"{provider.title} is served through Cloudflare AI Gateway only: set AI_GATEWAY_URL."
        return f"{provider.title} has no upstream: set AI_GATEWAY_URL, or {needs} with {key_name}."
    if not key:
        return f"{provider.title} has no upstream: set AI_GATEWAY_URL (Cloudflare AI Gateway) or {key_name} (direct)."
    return Upstream(provider, base, False, tuple(key_header))


def enabled_upstreams(settings: Settings) -> tuple[dict[str, tuple[Provider, Upstream | str]], dict[str, Provider]]:
    """Each enabled provider with its upstream (or the 503 message), and the whole registry (to tell
    'not enabled' from 'unknown'). Raises ``SettingsError`` for an unknown slug in ``PROVIDERS``, a
    bad ``PROVIDERS_FILE`` or a malformed ``{SLUG}_BASE_URL``: this is the catalogue's whole check,
    with nothing built."""
    registry = load_registry(settings.providers_file)
    if settings.providers is not None:
        unknown = [slug for slug in settings.providers if slug not in registry]
        if unknown:
            raise SettingsError(
                f"PROVIDERS names unknown providers: {', '.join(unknown)} (known: {', '.join(sorted(registry))})"
            )
    enabled = settings.providers if settings.providers is not None else tuple(registry)
    return {slug: (registry[slug], resolve(registry[slug], settings)) for slug in enabled}, registry


def mode(upstream: Upstream | str) -> str:
    """``gateway``, ``direct`` or ``unavailable``: how a provider is served, for logs and checks."""
    if isinstance(upstream, str):
        return "unavailable"
    return "gateway" if upstream.via_gateway else "direct"
