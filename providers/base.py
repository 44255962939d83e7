"""What a provider is: a small declarative description that the shared mount, auth, metadata and
relay read. Most providers are one entry in ``catalog.toml``; a provider whose paths need code is
a tiny module subclassing ``Provider`` (``workers_ai.py``, ``azure_openai.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from config import Settings
from service.core.errors import Shape

StreamFormat = Literal["openai-sse", "anthropic-sse", "google-sse", "cohere-sse", "workers-ai-sse"]


@dataclass(frozen=True, slots=True)
class Provider:
    """One upstream provider.

    ``slug`` is both the gateway's mount path (``/groq/…``) and Cloudflare AI Gateway's provider
    segment (``{AI_GATEWAY_URL}/groq/…``); its settings are ``{SLUG}_API_KEY`` and
    ``{SLUG}_BASE_URL`` (upper case, ``-`` → ``_``).
    """

    slug: str
    name: str = ""
    """Human name, for messages and docs."""
    error_shape: Shape = "openai"
    """How the gateway's own errors look to this provider's clients."""
    stream_format: StreamFormat = "openai-sse"
    """How its streams look (for reading usage on the side)."""
    strip_prefixes: tuple[str, ...] = ()
    """Leading path parts SDKs add that the upstream does not want (``v1/`` for OpenAI)."""
    openai_compatible_prefix: str | None = None
    """Paths under this prefix speak the OpenAI dialect, errors included."""
    key_header: str = "authorization"
    key_prefix: str = "Bearer "
    """How the provider key (``{SLUG}_API_KEY``) is sent upstream."""
    team_key_headers: tuple[str, ...] = ()
    """Headers besides ``Authorization: Bearer`` and ``x-api-key`` in which this provider's own SDK
    sends its key, so teams may put their gateway key there (``x-goog-api-key``, ``api-key``)."""
    direct_base_url: str | None = None
    """The provider's public API, used without Cloudflare (``{CF_ACCOUNT_ID}`` is filled in)."""
    gateway_token_as_key: bool = False
    """Through Cloudflare, send the gateway token as this provider's key when no key is set."""

    @property
    def title(self) -> str:
        return self.name or self.slug

    def rest_path(self, rest: str) -> str:
        for prefix in self.strip_prefixes:
            if rest.startswith(prefix):
                return rest[len(prefix) :]
            if rest == prefix.rstrip("/"):
                return ""
        return rest

    def gateway_url(self, gateway: str, rest: str) -> str:
        return f"{gateway}/{self.slug}/{self.rest_path(rest)}"

    def direct_url(self, base: str, rest: str) -> str:
        return f"{base}/{self.rest_path(rest)}"

    def default_direct_base(self, settings: Settings) -> str | None:
        if self.direct_base_url is None:
            return None
        if "{CF_ACCOUNT_ID}" in self.direct_base_url:
            if not settings.cf_account_id:
                return None
            return self.direct_base_url.replace("{CF_ACCOUNT_ID}", settings.cf_account_id)
        return self.direct_base_url

    def shape_for(self, rest: str) -> Shape:
        prefix = self.openai_compatible_prefix
        if prefix is not None and (rest.startswith(prefix) or rest == prefix.rstrip("/")):
            return "openai"
        return self.error_shape
