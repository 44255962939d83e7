"""A provider mounted at ``/{slug}``: the path check and the error shape, then the provider's app
(composed by the application: auth → metadata through Cloudflare → relay)."""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import ASGIApp, Receive, Scope, Send

from providers.base import Provider
from providers.paths import safe_rest
from providers.upstream import Upstream
from service.core.errors import BadRequest
from service.core.request import REST_KEY, SCOPE_KEY, RequestInfo


class ProviderMount:
    def __init__(self, provider: Provider, upstream: Upstream | str, app: ASGIApp) -> None:
        self.provider = provider
        self.available = isinstance(upstream, Upstream)
        self.via_gateway = isinstance(upstream, Upstream) and upstream.via_gateway
        self.prefix = ("/" + provider.slug).encode()
        self.app = app

    def matches(self, raw_path: bytes) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] == 47)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: the provider's app's own coroutine is handed on (``middleware.metadata``)
        info: RequestInfo = scope[SCOPE_KEY]
        info.provider = self.provider.slug
        raw = scope["raw_path"][len(self.prefix) :]
        try:
            rest = safe_rest(raw)
        except BadRequest:
            info.error_shape = self.provider.shape_for(raw.decode("latin-1").lstrip("/"))
            raise
        info.error_shape = self.provider.shape_for(rest)
        scope[REST_KEY] = rest
        return self.app(scope, receive, send)
