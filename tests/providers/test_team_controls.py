"""What a team can and cannot send upstream: Cloudflare's controls, credentials, configured URLs."""

from __future__ import annotations

import subprocess

import httpx
import openai
import orjson
import pytest

from service.mock_upstream import MockUpstream, Received
from tests.support import BIN, GATEWAY_TOKEN, GatewayProcess, free_port, gateway_env

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TEAM_CONTROLS = {
    "cf-aig-cache-ttl": "60",
    "cf-aig-skip-cache": "true",
    "cf-aig-request-timeout": "5000",
    "cf-aig-max-attempts": "3",
    "cf-aig-retry-delay": "1000",
    "cf-aig-backoff": "exponential",
}
OPERATOR_CONTROLS = {
    "cf-aig-collect-log": "false",
    "cf-aig-collect-log-payload": "false",
    "cf-aig-custom-cost": '{"total_cost": 0}',
    "cf-aig-event-id": "evt-forged",
    "cf-aig-log-id": "log-forged",
    "cf-aig-dlp": "off",
    "cf-aig-byok-alias": "someone-elses",
}


def cf_aig(sent: Received) -> dict[str, str]:
    return {k.lower(): v for k, v in sent.headers if k.lower().startswith("cf-aig-")}


def test_teams_set_caching_timeouts_and_retries_but_not_logging_cost_or_attribution(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    headers = {"authorization": f"Bearer {team_key}", **TEAM_CONTROLS, **OPERATOR_CONTROLS}
    assert httpx.post(f"{gateway.url}/openai/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    sent = cf_aig(upstream.last())
    for name, value in TEAM_CONTROLS.items():
        assert sent[name] == value
    assert not set(OPERATOR_CONTROLS) & set(sent)
    # the gateway's own: the token, the team's metadata, the per-team cache key
    assert sent["cf-aig-authorization"] == f"Bearer {GATEWAY_TOKEN}"
    assert orjson.loads(sent["cf-aig-metadata"])["team_id"] == "team_123"
    assert "cf-aig-cache-key" in sent


def test_cf_aig_allowed_headers_widens_the_list(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(CF_AIG_ALLOWED_HEADERS="cf-aig-event-id, CF-AIG-Collect-Log")
    key = gw.create_key()
    headers = {"authorization": f"Bearer {key}", **OPERATOR_CONTROLS}
    assert httpx.post(f"{gw.url}/openai/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    sent = cf_aig(upstream.last())
    assert sent["cf-aig-event-id"] == "evt-forged" and sent["cf-aig-collect-log"] == "false"
    assert "cf-aig-custom-cost" not in sent and "cf-aig-dlp" not in sent


def test_cf_aig_allowed_headers_cannot_hand_over_the_gateways_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = start_expecting_failure(tmp_path, CF_AIG_ALLOWED_HEADERS="cf-aig-authorization")
    assert result.splitlines()[-1].startswith("configuration error: CF_AIG_ALLOWED_HEADERS")


KEY_PLACES = ("query", "cookie", "x-goog-api-key", "api-key", "x-api-key", "proxy-authorization", "custom")


def call_with_key_everywhere(url: str, path: str, key: str, *, auth: dict[str, str], query: str = "") -> Received:
    headers = {
        **auth,
        "cookie": f"session=abc; gateway={key}",
        "x-goog-api-key": key,
        "api-key": key,
        "x-api-key": key,
        "proxy-authorization": f"Basic {key}",
        "x-note": f"key was {key.upper()}",
        "x-kept": "yes",
    }
    separator = "&" if query else "?"
    target = f"{url}{path}{'?' + query if query else ''}{separator}key={key}&other={key}&alt=sse"
    response = httpx.post(target, json=CHAT, headers=headers)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize(
    ("path", "query", "auth_header"),
    [
        ("/openai/v1/chat/completions", "", "authorization"),
        ("/anthropic/v1/messages", "", "x-api-key"),
        ("/google-ai-studio/v1beta/models/gemini-2.0-flash:generateContent", "", "x-goog-api-key"),
        ("/azure-openai/res/dep/chat/completions", "api-version=2024-10-21", "api-key"),
    ],
)
def test_the_team_key_reaches_the_upstream_nowhere(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream, path: str, query: str, auth_header: str
) -> None:
    auth = {auth_header: f"Bearer {team_key}" if auth_header == "authorization" else team_key}
    call_with_key_everywhere(gateway.url, path, team_key, auth=auth, query=query)
    sent = upstream.last()
    assert team_key not in sent.path and team_key not in sent.query
    assert "key=" not in sent.query and "other=" not in sent.query and "alt=sse" in sent.query
    if query:
        assert sent.query.startswith(query)
    for name, value in sent.headers:
        assert team_key.lower() not in value.lower(), name
    names = {name.lower() for name, _ in sent.headers}
    assert "cookie" not in names and "proxy-authorization" not in names and "x-note" not in names
    assert sent.header("x-kept") == "yes"


def test_percent_encoded_keys_in_the_query_are_removed_too(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    encoded = team_key.replace("_", "%5F")
    target = f"{gateway.url}/openai/models?k%65y=x&a={encoded}&b=1"
    assert httpx.get(target, headers={"authorization": f"Bearer {team_key}"}).status_code == 200
    assert upstream.last().query == "b=1"


def test_the_openai_sdk_cannot_leak_the_key_through_extra_places(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/openai/v1",
        api_key=team_key,
        default_query={"key": team_key},
        default_headers={"x-goog-api-key": team_key, "cookie": f"k={team_key}"},
        max_retries=0,
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    sent = upstream.last()
    assert team_key not in sent.query and all(team_key not in value for _, value in sent.headers)


def test_direct_mode_sends_no_cf_aig_header(make_gateway, direct_upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(
        upstream_url=None,
        OPENAI_API_KEY="sk-openai-direct",
        OPENAI_BASE_URL=f"{direct_upstream.url}/openai-api/v1",
        CF_AIG_ALLOWED_HEADERS="cf-aig-event-id",
    )
    key = gw.create_key()
    headers = {"authorization": f"Bearer {key}", **TEAM_CONTROLS, **OPERATOR_CONTROLS, "cookie": f"k={key}"}
    assert httpx.post(f"{gw.url}/openai/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    sent = direct_upstream.last()
    assert not cf_aig(sent) and sent.header("cookie") is None
    assert sent.header("authorization") == "Bearer sk-openai-direct"


def start_expecting_failure(tmp_path, **overrides: str) -> str:  # type: ignore[no-untyped-def]
    env = gateway_env(None, tmp_path, **overrides)
    command = [str(BIN / "uvicorn"), "--factory", "service.app:create_app", "--port", str(free_port())]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 3
    output = (result.stdout + result.stderr).decode()
    assert "Traceback" not in output
    return output


@pytest.mark.parametrize(
    "overrides",
    [
        {"OPENAI_BASE_URL": "http://user:hunter2-secret@127.0.0.1:9/v1", "OPENAI_API_KEY": "k"},
        {"AI_GATEWAY_URL": "https://acct:hunter2-secret@gateway.example/v1/a/g"},
    ],
)
def test_a_base_url_with_credentials_is_refused_without_echoing_them(tmp_path, overrides: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    output = start_expecting_failure(tmp_path, **overrides)
    name = next(iter(overrides))
    assert output.strip().splitlines()[-1].startswith(f"configuration error: {name} must not carry credentials")
    assert "hunter2" not in output


def test_the_start_up_view_never_shows_url_credentials() -> None:
    from config import Settings

    settings = Settings(
        ai_gateway_url="https://a:hunter2@gw.example/v1", provider_env={"GROQ_BASE_URL": "http://u:hunter2@h/v1"}
    )
    view = settings.public_view()
    assert "hunter2" not in str(view)
    assert view["provider_env"] == {"GROQ_BASE_URL": "http://***@h/v1"}


def test_oversized_client_metadata_is_dropped_and_logged(
    gateway: GatewayProcess, team_key: str, upstream: MockUpstream
) -> None:
    metadata = orjson.dumps({"user": "u", "pad": "x" * 12_000}).decode()  # under the 16 KiB header line cap
    headers = {"authorization": f"Bearer {team_key}", "cf-aig-metadata": metadata}
    response = httpx.get(f"{gateway.url}/openai/models", headers=headers)
    assert response.status_code == 200
    assert list(orjson.loads(upstream.last().header("cf-aig-metadata") or "")) == ["team_id", "team_name", "request_id"]
    request_id = response.headers["x-gateway-request-id"]
    gateway.access_line(request_id)
    assert any(
        line.get("event") == "client_metadata_dropped" and line.get("request_id") == request_id
        for line in gateway.log_lines()
    )
