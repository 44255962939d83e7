"""The token API against a running gateway: the original Worker's contract, bad input included."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import ADMIN_KEY, GatewayProcess, wait_until

KEY_RE = re.compile(r"sk_[0-9a-f]{64}")
KEY_ID_RE = re.compile(r"key_[0-9a-f]{16}")
TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
GOVERNANCE = ("allowedModels", "allowedProviders", "expiresAt", "expired")
NO_GOVERNANCE = {"allowedModels": None, "allowedProviders": None, "expiresAt": None, "expired": False}


def error_of(response: httpx.Response) -> str:
    """The token API's error message; every error names its request id, the same as the header's."""
    body = response.json()
    assert set(body) == {"error", "requestId"} and body["requestId"] == response.headers["x-gateway-request-id"]
    message: str = body["error"]
    return message


def test_create_returns_key_team_name_and_time(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_123", "name": "Acme Corp"}, headers=ADMIN)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"apiKey", "keyId", "teamId", "name", "createdAt", *GOVERNANCE}
    assert {name: body[name] for name in GOVERNANCE} == NO_GOVERNANCE
    assert KEY_RE.fullmatch(body["apiKey"]) and KEY_ID_RE.fullmatch(body["keyId"])
    assert body["keyId"][4:] not in body["apiKey"]
    assert body["teamId"] == "team_123" and body["name"] == "Acme Corp"
    assert TIME_RE.fullmatch(body["createdAt"])


def test_an_unknown_field_is_refused_naming_every_field_taken(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_x", "colour": "red"}, headers=ADMIN)
    assert response.status_code == 400
    message = response.json()["error"]
    assert "'colour'" in message
    assert all(name in message for name in ("teamId", "name", "allowedModels", "allowedProviders", "expiresAt"))


def test_name_defaults_to_team_id(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_noname"}, headers=ADMIN)
    assert response.status_code == 201
    assert response.json()["name"] == "team_noname"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "teamId"),
        ({"teamId": ""}, "teamId"),
        ({"teamId": "   "}, "teamId"),
        ({"teamId": 123}, "teamId"),
        ({"teamId": ["a"]}, "teamId"),
        ({"teamId": "t" * 129}, "teamId"),
        ({"teamId": "ok", "name": 5}, "name"),
        ({"teamId": "ok", "name": ""}, "name"),
        ({"teamId": "ok", "name": "n" * 257}, "name"),
        ({"teamId": "team\u001b[31m"}, "teamId"),
        ({"teamId": "ok", "name": "a\nb"}, "name"),
    ],
)
def test_bad_fields_are_400_naming_the_field(gateway: GatewayProcess, body: dict[str, object], field: str) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json=body, headers=ADMIN)
    assert response.status_code == 400
    assert field in response.json()["error"]


@pytest.mark.parametrize(
    ("content", "word"), [(b"{not json", "JSON"), (b"[1, 2]", "object"), (b"", "JSON"), (b'"team"', "object")]
)
def test_bad_json_is_400(gateway: GatewayProcess, content: bytes, word: str) -> None:
    response = httpx.post(f"{gateway.url}/tokens", content=content, headers=ADMIN)
    assert response.status_code == 400
    assert word in response.json()["error"]


def test_limits_are_accepted_at_the_edge(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "t" * 128, "name": "n" * 256}, headers=ADMIN)
    assert response.status_code == 201


def test_body_over_64_kib_is_413(gateway: GatewayProcess) -> None:
    big = b'{"teamId": "t", "name": "' + b"x" * (65 * 1024) + b'"}'
    response = httpx.post(f"{gateway.url}/tokens", content=big, headers=ADMIN)
    assert response.status_code == 413
    assert "error" in response.json()

    def chunks():  # no content-length: the limit holds for a streamed body too
        yield big[:40000]
        yield big[40000:]

    response = httpx.post(f"{gateway.url}/tokens", content=chunks(), headers=ADMIN)
    assert response.status_code == 413


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": ADMIN_KEY},
        {"authorization": "Basic abc"},
        {"x-api-key": ADMIN_KEY},
    ],
)
def test_create_without_the_admin_bearer_is_401(gateway: GatewayProcess, headers: dict[str, str]) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "t"}, headers=headers)
    assert response.status_code == 401
    assert ADMIN_KEY not in response.text


def test_a_team_key_is_not_an_admin_key(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.post(
        f"{gateway.url}/tokens", json={"teamId": "t"}, headers={"authorization": f"Bearer {team_key}"}
    )
    assert response.status_code == 401
    response = httpx.delete(f"{gateway.url}/tokens/{team_key}", headers={"authorization": f"Bearer {team_key}"})
    assert response.status_code == 401
    assert httpx.get(f"{gateway.url}/tokens/{team_key}").status_code == 200


def test_without_admin_key_configured_admin_calls_are_403(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(ADMIN_API_KEY="")
    response = httpx.post(f"{gw.url}/tokens", json={"teamId": "t"}, headers={"authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "ADMIN_API_KEY" in response.json()["error"]
    response = httpx.delete(f"{gw.url}/tokens/sk_{'0' * 64}", headers={"authorization": "Bearer anything"})
    assert response.status_code == 403


def test_show_refresh_and_revoke(gateway: GatewayProcess) -> None:
    created = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_life", "name": "Life"}, headers=ADMIN).json()
    key = created["apiKey"]

    shown = httpx.get(f"{gateway.url}/tokens/{key}")
    assert shown.status_code == 200
    assert shown.json() == {
        "keyId": created["keyId"],
        "teamId": "team_life",
        "name": "Life",
        "createdAt": created["createdAt"],
        **NO_GOVERNANCE,
    }

    refreshed = httpx.post(f"{gateway.url}/tokens/{key}/refresh")
    assert refreshed.status_code == 200
    new = refreshed.json()
    assert KEY_RE.fullmatch(new["apiKey"]) and new["apiKey"] != key
    assert (new["keyId"], new["teamId"], new["name"], new["createdAt"]) == (
        created["keyId"],  # the same key, with a new secret
        "team_life",
        "Life",
        created["createdAt"],
    )
    assert httpx.get(f"{gateway.url}/tokens/{key}").status_code == 404
    assert httpx.post(f"{gateway.url}/tokens/{key}/refresh").status_code == 404
    assert httpx.get(f"{gateway.url}/tokens/{new['apiKey']}").status_code == 200

    assert httpx.delete(f"{gateway.url}/tokens/{new['apiKey']}").status_code == 401
    deleted = httpx.delete(f"{gateway.url}/tokens/{new['apiKey']}", headers=ADMIN)
    assert deleted.status_code == 204 and deleted.content == b""
    assert httpx.delete(f"{gateway.url}/tokens/{new['apiKey']}", headers=ADMIN).status_code == 404
    missing = httpx.get(f"{gateway.url}/tokens/{new['apiKey']}")
    assert missing.status_code == 404
    assert error_of(missing) == "Token not found"


@pytest.mark.parametrize("key", [f"sk_{'0' * 64}", "sk_short", "not-a-key", f"SK_{'A' * 64}", "%00"])
def test_unknown_or_malformed_keys_are_404(gateway: GatewayProcess, key: str) -> None:
    assert error_of(httpx.get(f"{gateway.url}/tokens/{key}")) == "Token not found"
    assert httpx.post(f"{gateway.url}/tokens/{key}/refresh").status_code == 404
    assert httpx.delete(f"{gateway.url}/tokens/{key}", headers=ADMIN).status_code == 404


def test_unknown_routes_and_methods_are_json(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/nope")
    assert response.status_code == 404 and error_of(response) == "Not found"
    response = httpx.put(f"{gateway.url}/tokens")
    assert response.status_code == 405 and "error" in response.json()


def test_keys_are_stored_only_as_digests(gateway: GatewayProcess, tmp_path: Path) -> None:
    key = gateway.create_key("team_digest", "Digest")
    db_path = Path(gateway.env["DATABASE_URL"].removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    assert key.encode() not in raw and key[3:].encode() not in raw
    with sqlite3.connect(db_path) as db:
        digests = [row[0] for row in db.execute("SELECT digest FROM tokens")]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)


def test_health_and_readiness(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200


def test_keys_survive_a_restart(make_gateway) -> None:  # type: ignore[no-untyped-def]
    first = make_gateway()
    key = first.create_key("team_persist", "Persist")
    first.stop()
    second = make_gateway()
    assert httpx.get(f"{second.url}/tokens/{key}").json()["teamId"] == "team_persist"


def test_listing_pages_and_never_shows_keys(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway()
    keys = [gw.create_key(f"team_{n}", f"Team {n}") for n in range(5)]
    assert httpx.get(f"{gw.url}/tokens").status_code == 401
    first = httpx.get(f"{gw.url}/tokens?limit=2", headers=ADMIN)
    assert first.status_code == 200
    page = first.json()
    assert [t["teamId"] for t in page["tokens"]] == ["team_0", "team_1"] and page["nextCursor"]
    assert page["tokens"][0]["keyPrefix"] == keys[0][:8] + "…"
    assert set(page["tokens"][0]) == {"keyId", "keyPrefix", "teamId", "name", "createdAt", "lastUsedAt", *GOVERNANCE}
    rest = httpx.get(f"{gw.url}/tokens", params={"limit": 10, "cursor": page["nextCursor"]}, headers=ADMIN).json()
    assert [t["teamId"] for t in rest["tokens"]] == ["team_2", "team_3", "team_4"] and rest["nextCursor"] is None
    everything = first.text + httpx.get(f"{gw.url}/tokens?limit=10", headers=ADMIN).text
    assert all(key not in everything and key[8:] not in everything for key in keys)
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=%%%", "limit=-5", "limit=%20%205", "limit=1_0"):
        response = httpx.get(f"{gw.url}/tokens?{bad}", headers=ADMIN)
        assert response.status_code == 400 and "error" in response.json()
    for unicode_digits in ("²", "\uff15", "٣", "¹⁰"):  # digits to str.isdigit, not numbers to the API
        response = httpx.get(f"{gw.url}/tokens", params={"limit": unicode_digits}, headers=ADMIN)
        assert response.status_code == 400 and "limit" in response.json()["error"], response.text
    only = httpx.get(f"{gw.url}/tokens", params={"teamId": "team_3"}, headers=ADMIN).json()
    assert [t["teamId"] for t in only["tokens"]] == ["team_3"] and only["nextCursor"] is None
    bad_team = httpx.get(f"{gw.url}/tokens", params={"teamId": "a\x1bb"}, headers=ADMIN)
    assert bad_team.status_code == 400 and "teamId" in bad_team.json()["error"]


def test_last_used_at_is_recorded_off_the_request_path(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway()
    key = gw.create_key("team_used")
    before = httpx.get(f"{gw.url}/tokens", headers=ADMIN).json()["tokens"][0]
    assert before["lastUsedAt"] is None
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200

    def listed() -> dict[str, str]:
        token: dict[str, str] = httpx.get(f"{gw.url}/tokens", headers=ADMIN).json()["tokens"][0]
        return token

    wait_until(lambda: listed()["lastUsedAt"], 3, "lastUsedAt recorded")
    after = listed()
    assert TIME_RE.fullmatch(after["lastUsedAt"]) and after["lastUsedAt"] >= after["createdAt"]


def test_a_key_rotated_by_whoever_leaked_it_can_be_found_and_revoked_by_key_id(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = make_gateway()
    created = httpx.post(f"{gw.url}/tokens", json={"teamId": "team_leak", "name": "Leak"}, headers=ADMIN).json()
    owner_key, key_id = created["apiKey"], created["keyId"]
    stolen = httpx.post(f"{gw.url}/tokens/{owner_key}/refresh").json()["apiKey"]  # the key alone rotates it
    assert httpx.get(f"{gw.url}/tokens/{owner_key}").status_code == 404  # the owner is locked out

    listed = httpx.get(f"{gw.url}/tokens", params={"teamId": "team_leak"}, headers=ADMIN).json()["tokens"]
    assert [(t["keyId"], t["keyPrefix"]) for t in listed] == [(key_id, stolen[:8] + "…")]
    shown = httpx.get(f"{gw.url}/keys/{key_id}", headers=ADMIN)
    assert shown.status_code == 200
    body = shown.json()
    assert body["keyId"] == key_id and body["teamId"] == "team_leak" and body["keyPrefix"] == stolen[:8] + "…"
    assert set(body) == {
        "keyId",
        "keyPrefix",
        "teamId",
        "name",
        "createdAt",
        "lastUsedAt",
        "limits",
        "state",
        *GOVERNANCE,
    }
    assert stolen not in shown.text

    assert httpx.get(f"{gw.url}/keys/{key_id}").status_code == 401
    assert httpx.delete(f"{gw.url}/keys/{key_id}", headers={"authorization": f"Bearer {stolen}"}).status_code == 401
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {stolen}"}).status_code == 200
    revoked = httpx.delete(f"{gw.url}/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 204 and revoked.content == b""
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {stolen}"}).status_code == 401
    assert httpx.get(f"{gw.url}/tokens/{stolen}").status_code == 404
    for missing in (key_id, "key_0000000000000000", "key_nothex", owner_key):
        assert error_of(httpx.delete(f"{gw.url}/keys/{missing}", headers=ADMIN)) == "Key not found"
        assert httpx.get(f"{gw.url}/keys/{missing}", headers=ADMIN).status_code == 404


def test_revoking_all_of_a_teams_keys(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway()
    keys = [gw.create_key("team/with slash", "A") for _ in range(2)]
    other = gw.create_key("team_other", "B")
    for key in (*keys, other):
        assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.delete(f"{gw.url}/teams/team%2Fwith%20slash/keys").status_code == 401
    response = httpx.delete(f"{gw.url}/teams/team%2Fwith%20slash/keys", headers=ADMIN)
    assert response.status_code == 200 and response.json() == {"revoked": 2}
    for key in keys:
        assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {other}"}).status_code == 200
    assert httpx.delete(f"{gw.url}/teams/team%2Fwith%20slash/keys", headers=ADMIN).json() == {"revoked": 0}
    bad = httpx.delete(f"{gw.url}/teams/a%1Bb/keys", headers=ADMIN)
    assert bad.status_code == 400 and "teamId" in bad.json()["error"]


def test_revocations_by_key_id_and_team_reach_another_process(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """Two gateways on one database: a revocation through one is refused by the other, which had
    the key cached (polling with a deadline; the bound itself is the store's change counter)."""
    first, second = make_gateway(), make_gateway()
    by_id = httpx.post(f"{first.url}/tokens", json={"teamId": "team_x"}, headers=ADMIN).json()
    by_team = first.create_key("team_y")
    for key in (by_id["apiKey"], by_team):
        assert httpx.get(f"{second.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.delete(f"{first.url}/keys/{by_id['keyId']}", headers=ADMIN).status_code == 204
    assert httpx.delete(f"{first.url}/teams/team_y/keys", headers=ADMIN).json() == {"revoked": 1}
    for key in (by_id["apiKey"], by_team):

        def status(key: str = key) -> int:
            return httpx.get(f"{second.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code

        wait_until(lambda status=status: status() == 401, 5, "the other gateway refusing the key")
        assert status() == 401


def test_self_service_rotation_can_require_the_admin(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(SELF_SERVICE_ROTATION="false")
    key = gw.create_key("team_locked")
    refused = httpx.post(f"{gw.url}/tokens/{key}/refresh")
    assert refused.status_code == 401 and "admin" in refused.json()["error"]
    assert httpx.post(f"{gw.url}/tokens/{key}/refresh", headers={"authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.get(f"{gw.url}/tokens/{key}").status_code == 200  # still the owner's
    rotated = httpx.post(f"{gw.url}/tokens/{key}/refresh", headers=ADMIN)
    assert rotated.status_code == 200 and rotated.json()["apiKey"] != key

    no_admin = make_gateway(SELF_SERVICE_ROTATION="false", ADMIN_API_KEY="")
    assert httpx.post(f"{no_admin.url}/tokens/sk_{'0' * 64}/refresh").status_code == 403


def test_trailing_slashes_are_404_never_a_redirect(gateway: GatewayProcess, team_key: str) -> None:
    for path in (f"/tokens/{team_key}/", "/tokens/", "/healthz/", f"/tokens/{team_key}/refresh/", "/teams/", "/keys/"):
        for method in ("GET", "POST", "DELETE", "PATCH"):
            response = httpx.request(method, gateway.url + path, headers={"host": "evil.example"})
            assert response.status_code in (404, 405), (method, path, response.status_code)
            if path in ("/teams/", "/keys/") and method in ("GET", "PATCH"):  # not a team or key with no id
                assert response.status_code == 404, (method, path)
            assert "location" not in response.headers and "error" in response.json()
            assert team_key not in response.text


def test_the_access_line_names_the_key_id(gateway: GatewayProcess) -> None:
    created = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_line"}, headers=ADMIN).json()
    response = httpx.get(
        f"{gateway.url}/openai/models",
        headers={"authorization": f"Bearer {created['apiKey']}", "x-request-id": "key-id-line-1"},
    )
    assert response.status_code == 200
    line = gateway.access_line("key-id-line-1")
    assert line["key_id"] == created["keyId"] and line["team_id"] == "team_line"
    httpx.get(f"{gateway.url}/healthz", headers={"x-request-id": "key-id-line-2"})
    assert gateway.access_line("key-id-line-2")["key_id"] is None  # no key, no key id


def test_numbers_are_parsed_as_ascii_digits_only() -> None:
    from service.tokens import whole_number

    assert [whole_number(raw) for raw in ("0", "42", "0007")] == [0, 42, 7]
    assert all(whole_number(raw) is None for raw in ("", "²", "\uff15", "-5", "+5", " 5", "1_0", "1e3", "9" * 40))


async def test_an_unexpected_failure_is_a_json_500_with_the_request_id(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Whatever fails inside the token API answers JSON, never Starlette's text/plain 500."""
    from config import Settings
    from service.app import create_app

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    app = create_app(Settings(database_path=tmp_path / "g.db"))

    async def broken(request: object) -> None:
        raise RuntimeError("something nobody expected")

    app.app.fallback.add_route("/broken", broken)  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/broken", headers={"x-request-id": "req-broken-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["requestId"] == response.headers["x-gateway-request-id"] != "req-broken-1"
    assert "nobody expected" not in response.text
