"""CORS for browser clients: off by default, the listed origins only when on."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from config import Settings, SettingsError
from tests.support import GatewayProcess

APP = "https://app.example.com"
PREFLIGHT = {
    "origin": APP,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type, x-stainless-os",
}


def test_cors_is_off_by_default(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.options(f"{gateway.url}/openai/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in response.headers
    response = httpx.get(f"{gateway.url}/openai/models", headers={"origin": APP, "authorization": f"Bearer {team_key}"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_listed_origins_get_preflights_and_headers(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(CORS_ALLOW_ORIGINS=f"{APP}, https://other.example.com")
    key = gw.create_key()
    preflight = httpx.options(f"{gw.url}/openai/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200  # answered before auth: a preflight carries no key
    assert preflight.headers["access-control-allow-origin"] == APP
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    response = httpx.post(
        f"{gw.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"origin": APP, "authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == APP
    assert "x-gateway-request-id" in response.headers["access-control-expose-headers"].lower()
    refused = httpx.options(
        f"{gw.url}/openai/v1/chat/completions", headers={**PREFLIGHT, "origin": "https://evil.example.com"}
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    unauthenticated = httpx.post(f"{gw.url}/openai/v1/chat/completions", json={}, headers={"origin": APP})
    assert unauthenticated.status_code == 401  # CORS never stands in for the key


@pytest.mark.parametrize("raw", ["app.example.com", "https://app.example.com/path", "ftp://x"])
def test_malformed_origins_are_refused_at_start(raw: str) -> None:
    with pytest.raises(SettingsError, match="CORS_ALLOW_ORIGINS"):
        Settings.from_env({"CORS_ALLOW_ORIGINS": raw}, env_file=None)
