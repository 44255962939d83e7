"""The application: ``create_app(settings)`` wires settings, store, session pool and routes.

Shape of one process::

    RequestContext                       request id, timing, access line
    └── Gateway                          prefix dispatch, no routing table on the proxy path
        ├── /openai, /anthropic, …       ProviderMount → Auth → Metadata → Relay
        └── everything else              Starlette: token API, /healthz, /readyz, JSON 404s

The Starlette app owns the lifespan: it opens the store, the team cache and the one aiohttp
session of this worker, and hands them to every request through lifespan state.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings, SettingsError
from config.logging import configure_logging
from middleware.auth import UnknownKeyGuard
from middleware.context import SCOPE_KEY, RequestContext, RequestInfo
from providers.mount import ProviderMount, mount_providers
from service import tokens
from service.errors import AuthenticationFailed, Forbidden, GatewayError, NotFound, ServiceUnavailable
from service.metrics import Metrics
from service.respond import send_error
from service.store import StoreUnavailableError, store_for
from service.teams import TeamDirectory

log = structlog.get_logger("gateway")

GC_YOUNG_THRESHOLD = 20_000
STARTUP_FAILURE = 3  # uvicorn's supervisor stops instead of restarting a worker that exits with it


def http_session(settings: Settings) -> aiohttp.ClientSession:
    """The worker's one upstream session: no decompression, no cookies, no proxy from the environment."""
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # the relay's own deadline covers connecting and waiting for headers (504), never the stream
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        trust_env=False,
    )


def tune_gc() -> None:
    """Move start-up objects out of the collector's sight and collect the young generation less often.

    Requests allocate many short-lived objects; the default threshold (700) runs a young collection
    several times per request, and full collections walk every module object, which shows up as
    tail latency under load.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 50)


def make_lifespan(settings: Settings, metrics: Metrics) -> Any:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.info("gateway_starting", **settings.public_view(), upstreams=app.state.upstreams)
        if not settings.ai_gateway_url:
            log.warning(
                "ai_gateway_url_unset",
                message="AI_GATEWAY_URL is not set: providers with a key go direct, the others answer 503",
            )
        store = store_for(settings)
        try:
            await store.open()
        except StoreUnavailableError as exc:
            # one line and a start-up failure code, rather than the lifespan's traceback; uvicorn's
            # supervisor stops instead of restarting workers that exit with it
            log.error("store_unavailable_at_start", error=str(exc))
            sys.stdout.flush()
            os._exit(STARTUP_FAILURE)
        teams = TeamDirectory(store, settings.auth_cache_refresh_seconds, settings.store_outage_grace_seconds)
        await teams.start()
        session = http_session(settings)
        metrics.degraded_probe = lambda: teams.degraded
        await metrics.start()
        metrics_server = await serve_metrics(metrics, settings.metrics_port) if settings.metrics_port else None
        tune_gc()
        try:
            guard = UnknownKeyGuard(settings.unknown_key_limit, settings.trusted_proxies)
            yield {"http": session, "teams": teams, "store": store, "metrics": metrics, "guard": guard}
        finally:
            if metrics_server is not None:
                await metrics_server.cleanup()
            await teams.stop()
            await session.close()
            await store.close()
            await metrics.stop()
            log.info("gateway_stopped")

    return lifespan


async def metrics_endpoint(request: Request) -> Response:
    """/metrics on the public port: team ids and traffic are not for anyone who asks, so a bearer
    is needed (``METRICS_TOKEN``, else the admin key); ``METRICS_PORT`` serves it without one."""
    settings: Settings = request.app.state.settings
    expected = settings.metrics_token or settings.admin_api_key
    if not expected:
        raise Forbidden("Metrics need a bearer on the public port: set METRICS_TOKEN (or use METRICS_PORT).")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise AuthenticationFailed("Metrics need 'Authorization: Bearer <METRICS_TOKEN>' (or the admin key).")
    body, content_type = request.state.metrics.exposition()
    return Response(body, media_type=content_type)


async def serve_metrics(metrics: Metrics, port: int) -> Any:
    """/metrics on a port of its own. With several workers the first to bind it serves it (each
    reports every worker's figures); the others find the port taken and leave it to that one."""
    from aiohttp import web  # only with METRICS_PORT: aiohttp's server costs ~2 MiB of RSS

    async def handle(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "0.0.0.0", port).start()
    except OSError:
        await runner.cleanup()
        log.info("metrics_port_served_by_another_worker", port=port)
        return None
    log.info("metrics_port", port=port)
    return runner


OPENAPI = Path(__file__).with_name("openapi.json")


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    teams: TeamDirectory = request.state.teams
    try:
        await request.state.store.ping()
    except StoreUnavailableError:
        body: dict[str, object] = {
            "status": "unavailable",
            "store": "unreachable",
            "grace_seconds": teams.outage_grace_seconds,
        }
        if teams.outage_since is not None:
            body["outage_seconds"] = round(asyncio.get_running_loop().time() - teams.outage_since, 3)
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "store": "ok"})


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def store_error(request: Request, exc: Exception) -> Response:
    return await gateway_error(request, ServiceUnavailable("The key store is unavailable; try again shortly."))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Any other failure: a JSON 500 with the request id, never Starlette's text/plain one. Starlette
    re-raises the exception after this answer; ``RequestContext`` logs it with its traceback."""
    info: RequestInfo | None = request.scope.get(SCOPE_KEY)
    suffix = f" (request id: {info.request_id})" if info is not None else ""
    return JSONResponse({"error": "The gateway failed to handle this request." + suffix}, status_code=500)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client left while its body was being read: nothing to answer, 499 in the access line."""
    return Response(status_code=499)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


class Gateway:
    """Dispatch by first path segment: a provider mount, or the Starlette app for the rest."""

    def __init__(self, mounts: dict[str, ProviderMount], disabled: set[str], fallback: Starlette) -> None:
        self.mounts = mounts
        self.disabled = frozenset(disabled)
        self.fallback = fallback
        self.state = fallback.state
        enabled = ", ".join(mounts) or "none"
        self.not_enabled = f"This provider is not enabled on this gateway (enabled: {enabled})."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            end = path.find("/", 1)
            segment = path[1:end] if end > 0 else path[1:]
            mount = self.mounts.get(segment)
            if mount is None and segment in self.disabled:
                info = scope[SCOPE_KEY]
                info.provider = segment
                await send_error(send, NotFound(self.not_enabled), "plain", info.request_id)
                return
            if mount is not None:
                raw = scope.get("raw_path")
                if raw is None:
                    scope["raw_path"] = raw = path.encode()
                if mount.matches(raw):
                    await mount(scope, receive, send)
                    return
        await self.fallback(scope, receive, send)


def create_app(settings: Settings | None = None) -> ASGIApp:
    """Build the gateway. Without ``settings`` they are read from the environment and ``.env``;
    a malformed value ends the process with one line naming the variable."""
    if settings is None:
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            print(f"configuration error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(STARTUP_FAILURE) from None
    write_access = configure_logging(settings.log_level)
    metrics = Metrics()
    routes = [*tokens.routes, Route("/healthz", healthz), Route("/readyz", readyz), Route("/openapi.json", openapi)]
    if settings.metrics_port is None:
        routes.append(Route("/metrics", metrics_endpoint))
    starlette = Starlette(
        routes=routes,
        lifespan=make_lifespan(settings, metrics),
        exception_handlers={
            GatewayError: gateway_error,
            StoreUnavailableError: store_error,
            HTTPException: http_error,
            ClientDisconnect: client_gone,
            Exception: unexpected_error,
        },
    )
    # no redirect to the slash-less path: its absolute Location would be built from the client's
    # Host header, with whatever the path carries (a key) in it; such paths get a JSON 404 instead
    starlette.router.redirect_slashes = False
    starlette.state.settings = settings
    starlette.state.openapi = OPENAPI.read_bytes()
    try:
        mounts, registry = mount_providers(settings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE) from None
    starlette.state.upstreams = {
        slug: ("gateway" if m.via_gateway else "direct") if m.available else "unavailable" for slug, m in mounts.items()
    }
    app: ASGIApp = Gateway(mounts, set(registry) - set(mounts), starlette)
    if settings.cors_allow_origins:
        app = cors(app, settings.cors_allow_origins)
    return RequestContext(app, write_access=write_access, metrics=metrics)


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
