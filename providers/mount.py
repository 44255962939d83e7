"""A provider mounted at ``/{name}``: path check, then auth → metadata → relay."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from middleware.auth import Auth
from middleware.context import SCOPE_KEY, RequestInfo
from middleware.metadata import Metadata
from providers.base import Provider
from providers.paths import safe_rest
from providers.relay import REST_KEY, Relay
from service.errors import BadRequest
from service.respond import send_error


class ProviderMount:
    def __init__(self, provider: Provider, settings: Settings) -> None:
        self.provider = provider
        self.prefix = ("/" + provider.name).encode()
        self.app: ASGIApp = Auth(Metadata(Relay(provider, settings)))

    def matches(self, raw_path: bytes) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] == 47)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info: RequestInfo = scope[SCOPE_KEY]
        info.provider = self.provider.name
        try:
            rest = safe_rest(scope["raw_path"][len(self.prefix) :])
        except BadRequest as error:
            await send_error(send, error, self.provider.error_shape, info.request_id)
            return
        info.error_shape = self.provider.shape_for(rest)
        scope[REST_KEY] = rest
        await self.app(scope, receive, send)
