"""Provider routes fuzzed with hypothesis: arbitrary paths, headers and bodies, with and without a
valid key. Whatever comes in, the gateway answers without a 5xx of its own or a traceback, its own
errors are JSON in the provider's shape, and the team key never reaches the upstream."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.mock_upstream import MockUpstream
from tests.support import GatewayProcess, raw_request

PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google-ai-studio": "google",
    "workers-ai": "cloudflare",
    "groq": "openai",
    "cohere": "cohere",
}
SEGMENT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
) | st.sampled_from(["..", ".", "%2e%2e", "%2F", "v1", "chat", "completions", "@cf", "models", "_mock", "%00", "sk_"])
HEADER_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20) | st.sampled_from(
    [
        "cf-aig-metadata",
        "cf-aig-cache-key",
        "cf-aig-collect-log",
        "cf-aig-custom-cost",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "connection",
        "x-request-id",
    ]
)
HEADER_VALUE = st.binary(max_size=200).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
BODY = st.one_of(
    st.binary(max_size=2048),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=50),
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=20,
    ).map(orjson.dumps),
)


def gateway_shape(shape: str, body: Any) -> bool:
    if shape == "openai":
        return isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str)
    if shape == "anthropic":
        return body.get("type") == "error" and isinstance(body.get("error"), dict)
    if shape == "google":
        return isinstance(body.get("error"), dict) and "status" in body["error"]
    if shape == "cloudflare":
        return body.get("success") is False and isinstance(body.get("errors"), list)
    if shape == "cohere":
        return isinstance(body.get("message"), str)
    return isinstance(body.get("error"), str)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    provider=st.sampled_from(sorted(PROVIDERS)),
    segments=st.lists(SEGMENT, max_size=5),
    query=st.binary(max_size=40).map(lambda b: bytes(c for c in b if 0x21 <= c < 0x7F and c != 0x23)),
    headers=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6),
    body=BODY,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    keyed=st.sampled_from(["bearer", "x-api-key", "none", "wrong"]),
    leak=st.sampled_from(["", "cookie", "query", "x-goog-api-key", "api-key", "authorization", "custom"]),
)
def test_provider_routes_withstand_arbitrary_input(
    gateway: GatewayProcess,
    team_key: str,
    upstream: MockUpstream,
    provider: str,
    segments: list[str],
    query: bytes,
    headers: list[tuple[str, bytes]],
    body: bytes,
    method: str,
    keyed: str,
    leak: str,
) -> None:
    from urllib.parse import quote

    target = ("/" + provider + "/" + "/".join(quote(s, safe="%@:") for s in segments)).encode()
    if leak == "query":
        query = b"key=" + team_key.encode() + (b"&" + query if query else b"")
    if query:
        target += b"?" + query
    sent = [(name.encode(), value) for name, value in headers if name not in ("content-length", "host")]
    credential = {
        "bearer": [(b"authorization", b"Bearer " + team_key.encode())],
        "x-api-key": [(b"x-api-key", team_key.encode())],
        "none": [],
        "wrong": [(b"authorization", b"Bearer sk_" + b"0" * 64)],
    }[keyed]
    if leak and leak != "query":  # the key again, where a careless client might also put it
        name = {"cookie": b"cookie", "custom": b"x-my-key"}.get(leak, leak.encode())
        value = b"session=" + team_key.encode() if leak == "cookie" else team_key.encode()
        credential.append((name, b"Bearer " + value if leak == "authorization" else value))
    before = len(upstream.received)
    response = raw_request(gateway.url, method, target, credential + sent, body)
    status, response_headers, response_body = response.status, response.headers, response.body
    relayed = "server-timing" in response_headers  # the upstream answered: its status is its own
    if not relayed:
        assert status != 500, response_body
        if status not in (400, 431) or response_headers.get("content-type", "").startswith("application/json"):
            parsed = orjson.loads(response_body)
            shapes = {PROVIDERS[provider], "openai", "plain"}  # OpenAI-compatible sub-paths answer as OpenAI
            assert any(gateway_shape(shape, parsed) for shape in shapes), parsed
    assert b"Traceback" not in response_body
    for received in upstream.received[before:]:
        everything = " ".join([received.path, received.query, *(f"{k}: {v}" for k, v in received.headers)])
        assert team_key[3:] not in everything, "the team key reached the upstream"


def test_the_fuzzed_gateway_logged_no_traceback(gateway: GatewayProcess) -> None:
    assert "Traceback" not in gateway.log_text()
