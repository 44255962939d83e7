"""Inputs that must never turn into a 500, a leak or a corrupted request."""

from __future__ import annotations

import httpx
import orjson

from service.mock_upstream import MockUpstream
from tests.support import ADMIN_KEY, GatewayProcess, raw_request


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_control_characters_in_client_metadata_are_escaped(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    metadata = '{"user": "a\\u007fb", "note": "caf\\u00e9\\u0001"}'
    response = httpx.get(f"{gateway.url}/openai/models", headers={**bearer(team_key), "cf-aig-metadata": metadata})
    assert response.status_code == 200
    sent = upstream.last().header("cf-aig-metadata") or ""
    assert sent.isascii() and "\x7f" not in sent
    assert orjson.loads(sent)["user"] == "a\x7fb" and orjson.loads(sent)["note"] == "café\x01"


def test_team_names_with_control_characters_are_refused(gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{gateway.url}/tokens",
        json={"teamId": "t", "name": "a\x7fb"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 400 and "control" in response.json()["error"]


def test_unicode_team_names_reach_cloudflare_as_ascii_json(gateway: GatewayProcess, upstream: MockUpstream) -> None:
    key = gateway.create_key("team_ü", "Équipe ☃")
    assert httpx.get(f"{gateway.url}/openai/models", headers=bearer(key)).status_code == 200
    sent = upstream.last().header("cf-aig-metadata") or ""
    assert sent.isascii()
    assert orjson.loads(sent)["team_name"] == "Équipe ☃"


def test_non_ascii_header_values_pass_unchanged(gateway: GatewayProcess, team_key: str, upstream: MockUpstream) -> None:
    response = httpx.get(f"{gateway.url}/openai/models", headers={**bearer(team_key), "x-note": "café".encode()})
    assert response.status_code == 200
    assert upstream.last().header("x-note") == "café"


def test_headers_named_by_connection_stay_on_this_hop(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    headers = {**bearer(team_key), "connection": "keep-alive, x-hop", "x-hop": "1", "x-kept": "2"}
    assert httpx.get(f"{gateway.url}/openai/models", headers=headers).status_code == 200
    assert upstream.last().header("x-hop") is None and upstream.last().header("x-kept") == "2"


def test_upstream_reset_before_answering_is_502(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.post(f"{gateway.url}/openai/v1/_mock/reset", json={}, headers=bearer(team_key))
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unavailable"


def test_dropped_client_metadata_is_logged(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.get(f"{gateway.url}/openai/models", headers={**bearer(team_key), "cf-aig-metadata": "[1]"})
    request_id = response.headers["x-gateway-request-id"]
    gateway.access_line(request_id)
    assert any(
        line.get("event") == "client_metadata_dropped"
        and line.get("request_id") == request_id
        and line.get("reason") == "not a JSON object"
        for line in gateway.log_lines()
    )


def test_path_errors_under_openai_compatible_prefixes_are_openai_shaped(gateway: GatewayProcess, team_key: str) -> None:
    response = raw_request(gateway.url, "GET", "/workers-ai/v1/%2e%2e/x", bearer(team_key).items())
    assert response.status == 400 and orjson.loads(response.body)["error"]["type"] == "invalid_request_error"
    response = raw_request(gateway.url, "GET", "/workers-ai/%2e%2e/x", bearer(team_key).items())
    assert response.status == 400 and orjson.loads(response.body)["success"] is False


def test_keys_in_odd_token_paths_are_masked_in_logs(gateway: GatewayProcess, team_key: str) -> None:
    for target in (f"//tokens/{team_key}", f"/tokens//{team_key}", f"/tokens/{team_key}/refresh/"):
        raw_request(gateway.url, "GET", target)
    assert team_key not in gateway.log_text() and team_key[3:] not in gateway.log_text()
