"""The access line and the secrecy of keys, admin key and gateway token in logs and errors."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from config.logging import utc_iso, utc_iso_millis
from tests.support import ADMIN_KEY, GATEWAY_TOKEN, GatewayProcess

FIELDS = {
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "ttfb_ms",
    "upstream_status",
    "bytes_in",
    "bytes_out",
    "team_id",
    "provider",
    "truncated",
}


def test_one_access_line_per_request_with_its_fields(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.post(
        f"{gateway.url}/openai/v1/chat/completions?secret=1",
        json={"model": "m"},
        headers={"authorization": f"Bearer {team_key}"},
    )
    request_id = response.headers["x-gateway-request-id"]
    line = gateway.access_line(request_id)
    assert set(line) >= FIELDS
    assert line["method"] == "POST" and line["path"] == "/openai/v1/chat/completions"
    assert line["status"] == 200 and line["upstream_status"] == 200
    assert line["team_id"] == "team_123" and line["provider"] == "openai" and line["truncated"] is False
    assert line["bytes_in"] == len(response.request.content) and line["bytes_out"] == len(response.content)
    assert 0 < line["ttfb_ms"] <= line["duration_ms"]  # type: ignore[operator]
    assert line["level"] == "info" and "timestamp" in line
    assert (
        sum(
            1
            for entry in gateway.log_lines()
            if entry.get("request_id") == request_id and entry.get("event") == "request"
        )
        == 1
    )


def test_token_paths_show_only_a_key_prefix(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.get(f"{gateway.url}/tokens/{team_key}")
    line = gateway.access_line(response.headers["x-gateway-request-id"])
    assert line["path"] == f"/tokens/{team_key[:8]}…"
    unknown = team_key[:-1] + ("1" if team_key.endswith("0") else "0")  # never the session's own key
    response = httpx.post(f"{gateway.url}/tokens/{unknown}/refresh")
    line = gateway.access_line(response.headers["x-gateway-request-id"])
    assert line["path"] == f"/tokens/{team_key[:8]}…/refresh"


def test_startup_line_has_the_configuration_with_secrets_masked(gateway: GatewayProcess) -> None:
    start = next(line for line in gateway.log_lines() if line.get("event") == "gateway_starting")
    assert start["ai_gateway_id"] == "test-gateway"
    assert start["admin_api_key"] == "set" and start["ai_gateway_token"] == "set"
    assert start["ai_gateway_url"] == gateway.env["AI_GATEWAY_URL"]


def test_no_secret_in_any_log_line_or_error(gateway: GatewayProcess) -> None:
    key = gateway.create_key("team_secret", "Secret")
    bodies = []
    for response in (
        httpx.get(f"{gateway.url}/tokens/{key}"),
        httpx.post(f"{gateway.url}/tokens/{key}/refresh"),
        httpx.post(f"{gateway.url}/openai/v1/chat/completions", json={}, headers={"authorization": f"Bearer {key}"}),
        httpx.post(f"{gateway.url}/anthropic/v1/messages", json={}, headers={"x-api-key": key}),
        httpx.post(f"{gateway.url}/tokens", json={"teamId": "t"}, headers={"authorization": "Bearer " + key}),
        httpx.post(f"{gateway.url}/tokens", json={"teamId": 1}, headers={"authorization": f"Bearer {ADMIN_KEY}"}),
        httpx.get(
            f"{gateway.url}/openai/models",
            headers={"authorization": f"Bearer {key}", "cf-aig-metadata": "{bad"},
        ),
    ):
        bodies.append(response.text)
    log = gateway.log_text()
    for secret in (*gateway.keys, key, ADMIN_KEY, GATEWAY_TOKEN):
        assert secret not in log
        assert secret[3:] not in log
        assert all(secret not in body for body in bodies)
    assert "Traceback" not in log


def test_tracebacks_in_logs_carry_no_local_variables() -> None:
    from config.logging import render

    def fail(secret: str) -> None:
        raise RuntimeError("boom")

    try:
        fail("sk_" + "a" * 64)
    except RuntimeError as exc:
        line = render(None, "error", {"event": "unhandled_error", "exc_info": exc})
    assert b"boom" in line and b"a" * 64 not in line


def test_key_shaped_runs_are_masked_anywhere_in_a_logged_path(gateway: GatewayProcess) -> None:
    key = "sk_" + "0123456789abcdef" * 4
    for path in (f"/x/%20{key}", f"/x/%22{key}%22", f"/x/Bearer%20{key}", f"/x/x{key}", f"/x/{key.upper()}"):
        response = httpx.get(f"{gateway.url}{path}")
        line = gateway.access_line(response.headers["x-gateway-request-id"])
        assert "0123456789abcdef" not in str(line["path"]).lower(), line["path"]
    response = httpx.get(f"{gateway.url}/tokens/{key[3:]}")
    assert key[3:] not in str(gateway.access_line(response.headers["x-gateway-request-id"])["path"])
    assert key[8:].lower() not in gateway.log_text().lower()


def test_a_key_sent_as_request_id_is_not_echoed_or_logged(gateway: GatewayProcess) -> None:
    key = "sk_" + "fedcba9876543210" * 4
    response = httpx.get(f"{gateway.url}/healthz", headers={"x-request-id": key})
    assert key not in response.headers["x-gateway-request-id"]
    assert key[8:] not in gateway.log_text()


def test_library_log_lines_mask_keys_too() -> None:
    from config.logging import render

    key = "sk_" + "c0ffee" * 10 + "abcd"
    line = render(None, "warning", {"event": "x", "detail": f"GET /x?k={key}", "nested": {"v": [key]}})
    assert key[8:].encode() not in line and b"sk_c0ffe\xe2\x80\xa6" in line


@pytest.mark.parametrize(
    "seconds", [0.0, 0.5, 1764774000.0, 1764774000.000499, 1764774000.123456, 1764774000.999999, 1764774001.25]
)
def test_times_are_utc_iso_truncated_to_their_unit(seconds: float) -> None:
    """The access line's time (microseconds) and the ledger's (milliseconds), as ``datetime`` writes
    them, truncated as ``%d`` truncates; the second before and after another second too."""
    moment = datetime.fromtimestamp(seconds, UTC)
    micro = int((seconds - int(seconds)) * 1_000_000)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{micro:06d}Z"
    for _ in range(2):  # formatted, then the second reused
        assert utc_iso(seconds) == expected
        assert utc_iso(seconds, milliseconds=True) == expected[:-4] + "Z"
        millis = int(seconds) * 1000 + micro // 1000
        assert utc_iso_millis(millis) == expected[:-4] + "Z"
        assert utc_iso(1.0) == "1970-01-01T00:00:01.000000Z"  # another second in between
