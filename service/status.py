"""The gateway's own endpoints besides the token API: health, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from config import Settings
from service.core.errors import AuthenticationFailed, Forbidden
from service.core.store import StoreUnavailableError
from service.core.teams import TeamDirectory


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
    limiter = request.state.limiter
    if limiter.degraded:  # still serving: limits pass unchecked (open) or limited requests get 503 (closed)
        return JSONResponse({"status": "degraded", "store": "ok", "limits": "unreachable"})
    return JSONResponse({"status": "ready", "store": "ok", "limits": limiter.kind})
