"""A provider mounted at ``/{slug}``: path check, then auth → metadata (through Cloudflare) → relay."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings, SettingsError
from middleware.auth import Auth
from middleware.context import SCOPE_KEY, RequestInfo
from middleware.metadata import Metadata
from providers.base import Provider
from providers.paths import safe_rest
from providers.registry import load_registry
from providers.relay import REST_KEY, Relay
from providers.upstream import Upstream, resolve
from service.errors import BadRequest
from service.respond import send_error


class ProviderMount:
    def __init__(self, provider: Provider, upstream: Upstream | str, settings: Settings) -> None:
        self.provider = provider
        self.available = isinstance(upstream, Upstream)
        self.via_gateway = isinstance(upstream, Upstream) and upstream.via_gateway
        self.prefix = ("/" + provider.slug).encode()
        relay: ASGIApp = Relay(provider, upstream, settings)
        if isinstance(upstream, Upstream) and upstream.via_gateway:
            relay = Metadata(relay)  # cf-aig-metadata is for Cloudflare; direct, the access line has the team
        self.app: ASGIApp = Auth(relay, key_headers=provider.team_key_headers)

    def matches(self, raw_path: bytes) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] == 47)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        info.provider = self.provider.slug
        raw = scope["raw_path"][len(self.prefix) :]
        try:
            rest = safe_rest(raw)
        except BadRequest as error:
            shape = self.provider.shape_for(raw.decode("latin-1").lstrip("/"))
            await send_error(send, error, shape, info.request_id)
            return
        info.error_shape = self.provider.shape_for(rest)
        scope[REST_KEY] = rest
        await self.app(scope, receive, send)


def mount_providers(settings: Settings) -> tuple[dict[str, ProviderMount], dict[str, Provider]]:
    """The enabled providers' mounts by slug, and the whole registry (to tell 'not enabled' from
    'unknown'). Raises ``SettingsError`` for an unknown slug in ``PROVIDERS``, a bad
    ``PROVIDERS_FILE`` or a malformed ``{SLUG}_BASE_URL``."""
    registry = load_registry(settings.providers_file)
    if settings.providers is not None:
        unknown = [slug for slug in settings.providers if slug not in registry]
        if unknown:
            raise SettingsError(
                f"PROVIDERS names unknown providers: {', '.join(unknown)} (known: {', '.join(sorted(registry))})"
            )
    enabled = settings.providers if settings.providers is not None else tuple(registry)
    mounts = {slug: ProviderMount(registry[slug], resolve(registry[slug], settings), settings) for slug in enabled}
    return mounts, registry
