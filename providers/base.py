"""What a provider is: a small description the shared auth, metadata and relay read."""

from __future__ import annotations

from dataclasses import dataclass

from config import Settings
from service.errors import Shape


@dataclass(frozen=True, slots=True)
class Provider:
    """One upstream provider behind Cloudflare AI Gateway.

    ``name`` is both the gateway's mount path (``/openai/…``) and Cloudflare's provider slug
    (``{AI_GATEWAY_URL}/openai/…``).
    """

    name: str
    error_shape: Shape
    strip_v1: bool = False
    """Drop a leading ``v1/`` from the path, for SDK base URLs ending in ``/v1``."""
    openai_compatible_prefix: str | None = None
    """Paths under this prefix speak the OpenAI dialect, errors included."""
    key_header: str | None = None
    key_prefix: str = ""
    key_setting: str | None = None
    """The setting (attribute of ``Settings``) holding the provider key sent in ``key_header``."""
    gateway_token_as_authorization: bool = False
    """Send the gateway token as ``Authorization: Bearer`` too (Workers AI through Cloudflare)."""

    def upstream_path(self, rest: str) -> str:
        if self.strip_v1:
            if rest == "v1":
                return ""
            if rest.startswith("v1/"):
                return rest[3:]
        return rest

    def shape_for(self, rest: str) -> Shape:
        if self.openai_compatible_prefix is not None and (
            rest == self.openai_compatible_prefix.rstrip("/")
            or rest.startswith(self.openai_compatible_prefix)
        ):
            return "openai"
        return self.error_shape

    def upstream_headers(self, settings: Settings) -> list[tuple[str, str]]:
        """Headers this provider adds to every upstream request: gateway token and provider key."""
        added: list[tuple[str, str]] = []
        if settings.ai_gateway_token:
            added.append(("cf-aig-authorization", f"Bearer {settings.ai_gateway_token}"))
        key = getattr(settings, self.key_setting) if self.key_setting else None
        if key and self.key_header:
            added.append((self.key_header, f"{self.key_prefix}{key}"))
        elif self.gateway_token_as_authorization and settings.ai_gateway_token:
            added.append(("authorization", f"Bearer {settings.ai_gateway_token}"))
        return added
