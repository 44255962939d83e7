"""The application: ``create_app(settings)`` composes the request path and the gateway's own API.

Shape of one process::

    RequestContext                       request id, timing, the error boundary, the access line
    └── (CORS, when CORS_ALLOW_ORIGINS)
        └── Gateway                      prefix dispatch, no routing table on the proxy path
            ├── /openai, /anthropic, …   ProviderMount → Auth → AllowLists → LimitsGate → Metadata (through
            │                            Cloudflare) → Relay
            ├── /admin, /admin/…          the admin console (service.console), unless ADMIN_CONSOLE=false
            └── everything else          Starlette: token API, /healthz, /readyz, /metrics, JSON 404s

The Starlette app owns the lifespan (``service.lifespan``): it opens the store, the key cache and
the one aiohttp session of this worker, and hands them to every request through lifespan state.
Errors raised on the proxy path are answered by ``RequestContext``; those raised in the Starlette
app by its exception handlers below, through the same renderer.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings, SettingsError
from config.logging import configure_logging
from middleware.allow_lists import AllowLists
from middleware.auth import Auth
from middleware.context import RequestContext
from middleware.limits import LimitsGate
from middleware.metadata import Metadata
from providers.base import Provider
from providers.budget import BudgetEstimator
from providers.metering import path_model
from providers.mount import ProviderMount
from providers.prices import PriceTable, load_prices
from providers.relay import Relay
from providers.upstream import Upstream, enabled_upstreams, mode
from service import governance, status, teams_api, tokens, usage
from service.console import Console, SecurityHeaders
from service.core.errors import GatewayError, NotFound, error_head, render, store_unavailable
from service.core.metrics import Metrics
from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import StoreUnavailableError
from service.lifespan import STARTUP_FAILURE, make_lifespan

UNEXPECTED = GatewayError("The gateway failed to handle this request.")
_HTTP_MESSAGES = {404: "Not found", 405: "Method not allowed"}


def error_response(request: Request, error: GatewayError) -> Response:
    """A gateway error as the token API answers it: the one renderer, with the request id."""
    info: RequestInfo | None = request.scope.get(SCOPE_KEY)
    body = render(error, "plain", info.request_id if info is not None else None)
    head = {name.decode(): value.decode() for name, value in error_head(error, body)}
    return Response(body, status_code=error.status, headers=head)


async def gateway_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StoreUnavailableError):
        return error_response(request, store_unavailable())
    assert isinstance(exc, GatewayError)
    return error_response(request, exc)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Any other failure: a JSON 500 with the request id, never Starlette's text/plain one. Starlette
    re-raises the exception after this answer; ``RequestContext`` logs it with its traceback."""
    return error_response(request, UNEXPECTED)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client left while its body was being read: nothing to answer, 499 in the access line."""
    return Response(status_code=499)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = GatewayError(_HTTP_MESSAGES.get(exc.status_code, exc.detail))
    error.status = exc.status_code
    response = error_response(request, error)
    response.headers.update(exc.headers or {})
    return response


class Gateway:
    """Dispatch by first path segment: the admin console, a provider mount, or the Starlette app for the rest."""

    def __init__(
        self, mounts: dict[str, ProviderMount], disabled: set[str], fallback: ASGIApp, console: ASGIApp | None = None
    ) -> None:
        self.mounts = mounts
        self.disabled = frozenset(disabled)
        self.fallback = fallback
        self.console = console
        enabled = ", ".join(mounts) or "none"
        self.not_enabled = f"This provider is not enabled on this gateway (enabled: {enabled})."

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: the chosen app's own coroutine is handed on (``middleware.metadata``)
        if scope["type"] == "http":
            path: str = scope["path"]
            end = path.find("/", 1)
            segment = path[1:end] if end > 0 else path[1:]
            if segment == "admin" and self.console is not None:
                return self.console(scope, receive, send)
            mount = self.mounts.get(segment)
            if mount is None and segment in self.disabled:
                scope[SCOPE_KEY].provider = segment
                raise NotFound(self.not_enabled)
            if mount is not None:
                raw = scope.get("raw_path")
                if raw is None:
                    scope["raw_path"] = raw = path.encode()
                if mount.matches(raw):
                    return mount(scope, receive, send)
        return self.fallback(scope, receive, send)


def provider_mount(
    provider: Provider, upstream: Upstream | str, settings: Settings, prices: PriceTable | None
) -> ProviderMount:
    """One provider's request path: auth, allow-lists, limits, then (through Cloudflare) metadata, then
    the relay. A request an allow-list refuses reserves nothing against the limits."""
    app: ASGIApp = Relay(provider, upstream, settings, prices)
    if isinstance(upstream, Upstream) and upstream.via_gateway:
        app = Metadata(app)  # cf-aig-metadata is for Cloudflare; direct, the access line has the team
    app = LimitsGate(
        app,
        estimate=BudgetEstimator(provider.slug, prices, settings.budget_default_max_tokens),
        max_body=settings.max_request_bytes,
        unpriced_allowed=settings.budget_unpriced == "allow",
    )
    models_in_path = partial(path_model, provider.slug)
    app = AllowLists(app, provider=provider.slug, path_model=models_in_path, max_body=settings.max_request_bytes)
    return ProviderMount(provider, upstream, Auth(app, key_headers=provider.team_key_headers))


def cors(app: ASGIApp, origins: tuple[str, ...]) -> ASGIApp:
    """Browser clients of the listed origins: preflights answered here (before auth, which a
    preflight never carries), any request header allowed (SDKs send their own), no cookies."""
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        allow_credentials=False,
        expose_headers=["x-gateway-request-id", "server-timing", "retry-after", "request-id", "x-request-id"],
        max_age=600,
    )


def create_app(settings: Settings | None = None) -> ASGIApp:
    """Build the gateway. Without ``settings`` they are read from the environment and ``.env``;
    a malformed value ends the process with one line naming the variable."""
    try:
        settings = settings or Settings.from_env()
        upstreams, registry = enabled_upstreams(settings)
        prices = load_prices(settings.prices_file) if settings.usage_metering else None
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE) from None
    write_access = configure_logging(settings.log_level)
    metrics = Metrics(team_labels=settings.metrics_team_labels)
    routes = [
        *teams_api.routes,
        *tokens.routes,
        *teams_api.team_routes,
        *governance.routes,
        *usage.routes,
        Route("/healthz", status.healthz),
        Route("/readyz", status.readyz),
        Route("/openapi.json", status.openapi),
    ]
    if settings.metrics_port is None:
        routes.append(Route("/metrics", status.metrics_endpoint))
    starlette = Starlette(
        routes=routes,
        lifespan=make_lifespan(settings, metrics),
        exception_handlers={
            GatewayError: gateway_error,
            StoreUnavailableError: gateway_error,
            HTTPException: http_error,
            ClientDisconnect: client_gone,
            Exception: unexpected_error,
        },
    )
    # no redirect to the slash-less path: its absolute Location would be built from the client's
    # Host header, with whatever the path carries (a key) in it; such paths get a JSON 404 instead
    starlette.router.redirect_slashes = False
    starlette.state.settings = settings
    starlette.state.openapi = status.OPENAPI.read_bytes()
    starlette.state.upstreams = {slug: mode(upstream) for slug, (_, upstream) in upstreams.items()}
    starlette.state.known_providers = tuple(registry)
    mounts = {
        slug: provider_mount(provider, upstream, settings, prices) for slug, (provider, upstream) in upstreams.items()
    }
    console = (
        SecurityHeaders(Console(settings, starlette.state.upstreams, tuple(registry)))
        if settings.admin_console
        else None
    )
    app: ASGIApp = Gateway(mounts, set(registry) - set(mounts), starlette, console)
    if settings.cors_allow_origins:
        app = cors(app, settings.cors_allow_origins)
    return RequestContext(app, write_access=write_access, metrics=metrics)
