"""What a worker opens at start and closes at stop: the store and its key cache, the upstream
connection pool, metrics (and their own port), the unknown-key guard, the sweeps (usage retention, key
expiries into the audit trail); handed to every request through lifespan state (``scope["state"]``)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette

from config import Settings
from middleware.key_guard import UnknownKeyGuard
from providers.connections import ConnectionPool
from service.core.audit import record_expiries
from service.core.ledger import Ledger
from service.core.limits.limiter import NEEDS_REDIS, serving_limiter
from service.core.limits.outcome import Subject
from service.core.metrics import Metrics
from service.core.store import StoreUnavailableError, TokenStore, store_for
from service.core.store.base import prune_old_usage
from service.core.teams import TeamDirectory

log = structlog.get_logger("gateway")

GC_YOUNG_THRESHOLD = 20_000
PRUNE_EVERY_SECONDS = 24 * 3600
EXPIRY_SWEEP_SECONDS = 5.0
STARTUP_FAILURE = 3  # uvicorn's supervisor stops instead of restarting a worker that exits with it


UPSTREAM_CONNECTIONS = 1024
UPSTREAM_KEEPALIVE_SECONDS = 30.0


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

        async def seed(subject: Subject, period: str) -> int:
            return await store.spent(subject.kind, subject.ident, None if period == "total" else period)

        limiter = serving_limiter(settings, seed)
        if limiter.kind == "unshared" and await store.any_limits():
            log.error("limits_need_redis", message=NEEDS_REDIS)
            sys.stdout.flush()
            os._exit(STARTUP_FAILURE)
        await limiter.start()
        teams = TeamDirectory(store, settings.auth_cache_refresh_seconds, settings.store_outage_grace_seconds)
        await teams.start()
        pool = ConnectionPool(limit=UPSTREAM_CONNECTIONS, keepalive=UPSTREAM_KEEPALIVE_SECONDS)
        metrics.degraded_probe = lambda: teams.degraded
        metrics.limits_degraded_probe = lambda: limiter.degraded
        await metrics.start()
        metrics_server = await serve_metrics(metrics, settings.metrics_port) if settings.metrics_port else None
        ledger = Ledger(store) if settings.usage_metering else None
        pruning = None
        if ledger is not None:
            await ledger.start()
            metrics.dropped_probe = lambda: ledger.dropped
            pruning = asyncio.create_task(prune_daily(store, settings.usage_retention_days), name="usage-prune")
        expiries = asyncio.create_task(sweep_expiries(store), name="expiry-sweep")
        tune_gc()
        try:
            guard = UnknownKeyGuard(settings.unknown_key_limit, settings.trusted_proxies)
            state = {
                "http": pool,
                "teams": teams,
                "store": store,
                "metrics": metrics,
                "guard": guard,
                "limiter": limiter,
            }
            yield {**state, "ledger": ledger}
        finally:
            if metrics_server is not None:
                await metrics_server.cleanup()
            expiries.cancel()
            if pruning is not None:
                pruning.cancel()
            if ledger is not None:
                await ledger.stop()  # after the last request: every row is written before the store closes
            await teams.stop()
            await limiter.stop()  # after the last request: its release is sent
            await pool.close()
            await store.close()
            await metrics.stop()
            log.info("gateway_stopped")

    return lifespan


async def prune_daily(store: TokenStore, retention_days: int) -> None:
    """Delete ledger rows past ``USAGE_RETENTION_DAYS`` (daily totals stay), at start and daily."""
    while True:
        try:
            pruned = await prune_old_usage(store, retention_days)
            if pruned:
                log.info("usage_pruned", rows=pruned, retention_days=retention_days)
        except StoreUnavailableError as exc:
            log.warning("usage_prune_failed", error=str(exc))
        await asyncio.sleep(PRUNE_EVERY_SECONDS)


async def sweep_expiries(store: TokenStore) -> None:
    """Record each key's expiry in the audit trail (``key.expired``, actor ``system``) within
    ``EXPIRY_SWEEP_SECONDS`` of its time, once whichever worker or replica notices it first. The
    key is refused from its expiry time on regardless: the request path compares the time itself."""
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_SECONDS)
        try:
            await record_expiries(store)
        except StoreUnavailableError as exc:
            log.warning("expiry_sweep_failed", error=str(exc))


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
