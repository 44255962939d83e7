"""Key governance through the API: expiry (by time, 401 "expired", listed, audited), rotation with a
grace period on two replicas, PATCH of keys and teams, and the audit trail with its actors, filters
and paging, never holding a secret."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import ADMIN_KEY, BIN, GatewayProcess, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
HI = [{"role": "user", "content": "hi"}]


def call(gateway: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"authorization": f"Bearer {key}"},
    )


def create(gateway: GatewayProcess, **fields: object) -> dict[str, Any]:
    response = httpx.post(f"{gateway.url}/tokens", json=fields, headers=ADMIN)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def events(gateway: GatewayProcess, **query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{gateway.url}/audit", params={"limit": "500", **query}, headers=ADMIN)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def test_expiry_by_time(gateway: GatewayProcess) -> None:
    created = create(gateway, teamId="team_expiring", expiresIn="2s")
    key, key_id = created["apiKey"], created["keyId"]
    assert created["expired"] is False and created["expiresAt"] > created["createdAt"]
    assert call(gateway, key).status_code == 200
    wait_until(lambda: call(gateway, key).status_code == 401, 5, "the key expiring")
    refused = call(gateway, key).json()["error"]
    assert "expired" in refused["message"] and refused["code"] == "expired_api_key"
    unknown = call(gateway, "sk_" + "0" * 64).json()["error"]
    assert "expired" not in unknown["message"] and unknown["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError, match="expired"):
        openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=HI
        )
    listed = httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_expiring"}, headers=ADMIN).json()["tokens"]
    assert [(row["keyId"], row["expired"]) for row in listed] == [(key_id, True)]
    assert httpx.get(f"{gateway.url}/keys/{key_id}", headers=ADMIN).json()["expired"] is True
    # an expired key cannot rotate itself out of its expiry
    assert httpx.post(f"{gateway.url}/tokens/{key}/refresh").status_code == 401

    wait_until(lambda: events(gateway, keyId=key_id, action="key.expired"), 10, "the expiry audited")
    (expired,) = events(gateway, keyId=key_id, action="key.expired")
    assert expired["actor"] == "system" and expired["teamId"] == "team_expiring"

    # the admin may give it more time
    patched = httpx.patch(f"{gateway.url}/keys/{key_id}", json={"expiresIn": "1h"}, headers=ADMIN)
    assert patched.status_code == 200 and patched.json()["expired"] is False
    wait_until(lambda: call(gateway, key).status_code == 200, 2, "the key working again")
    cleared = httpx.patch(f"{gateway.url}/keys/{key_id}", json={"expiresAt": None}, headers=ADMIN).json()
    assert cleared["expiresAt"] is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"expiresIn": "30x"}, "expiresIn"),
        ({"expiresIn": "0s"}, "expiresIn"),
        ({"expiresIn": "3651d"}, "expiresIn"),
        ({"expiresIn": 30}, "expiresIn"),
        ({"expiresAt": "2020-01-01T00:00:00Z"}, "future"),
        ({"expiresAt": "tomorrow"}, "expiresAt"),
        ({"expiresAt": "2026-13-40T00:00:00Z"}, "expiresAt"),
        ({"expiresAt": "2999-01-01T00:00:00Z"}, "3650 days"),
        ({"expiresIn": "1d", "expiresAt": "2030-01-01"}, "not both"),
        ({"allowedModels": "gpt-4o"}, "allowedModels"),
        ({"allowedModels": [""]}, "allowedModels"),
        ({"allowedModels": ["a\x1bb"]}, "allowedModels"),
        ({"allowedModels": ["x"] * 101}, "allowedModels"),
        ({"allowedProviders": ["opneai"]}, "opneai"),
        ({"allowedProviders": ["OpenAI"]}, "allowedProviders"),
        ({"allowedModel": ["gpt-4o"]}, "allowedModel"),
    ],
)
def test_bad_fields_are_refused_by_name(gateway: GatewayProcess, fields: dict[str, object], named: str) -> None:
    response = httpx.post(f"{gateway.url}/tokens", json={"teamId": "team_bad", **fields}, headers=ADMIN)
    assert response.status_code == 400 and named in response.json()["error"], response.text


def test_patch_key_and_team(gateway: GatewayProcess) -> None:
    created = create(gateway, teamId="team_patch", allowedModels=["gpt-4o*", "gpt-4o*"], allowedProviders=["openai"])
    assert created["allowedModels"] == ["gpt-4o*"] and created["allowedProviders"] == ["openai"]
    key_id = created["keyId"]
    url = f"{gateway.url}/keys/{key_id}"
    assert httpx.patch(url, json={"allowedModels": []}).status_code == 401
    unknown = httpx.patch(url, json={"limitz": 1}, headers=ADMIN)
    assert unknown.status_code == 400 and "limitz" in unknown.json()["error"]
    assert httpx.patch(url, content=b"[1]", headers=ADMIN).status_code == 400
    assert httpx.patch(f"{gateway.url}/keys/key_0000000000000000", json={}, headers=ADMIN).status_code == 404
    assert httpx.patch(f"{gateway.url}/keys/nope", json={}, headers=ADMIN).status_code == 404
    patched = httpx.patch(url, json={"allowedModels": [], "allowedProviders": None}, headers=ADMIN).json()
    assert (patched["allowedModels"], patched["allowedProviders"]) == (None, None)
    assert httpx.get(url, headers=ADMIN).json()["allowedModels"] is None

    team_url = f"{gateway.url}/teams/team_patch"
    shown_team = httpx.get(team_url, headers=ADMIN).json()
    assert {name: shown_team[name] for name in ("teamId", "allowedModels", "allowedProviders", "updatedAt")} == {
        "teamId": "team_patch",
        "allowedModels": None,
        "allowedProviders": None,
        "updatedAt": None,
    }
    assert shown_team["keyCount"] == 1 and set(shown_team) >= {"name", "limits", "state"}
    assert httpx.get(f"{gateway.url}/teams/team_nobody", headers=ADMIN).status_code == 404
    assert httpx.get(team_url).status_code == 401
    bad = httpx.patch(team_url, json={"expiresIn": "1d"}, headers=ADMIN)
    assert bad.status_code == 400 and "expiresIn" in bad.json()["error"]
    set_first = httpx.patch(f"{gateway.url}/teams/team%2Fnew", json={"allowedProviders": ["anthropic"]}, headers=ADMIN)
    assert set_first.status_code == 200 and set_first.json()["keyCount"] == 0  # settings before any key
    assert httpx.get(f"{gateway.url}/teams/team%2Fnew", headers=ADMIN).json()["allowedProviders"] == ["anthropic"]
    (changed,) = events(gateway, teamId="team/new")
    assert changed["changes"] == {"allowedProviders": {"before": None, "after": ["anthropic"]}}


def test_rotation_with_grace_on_two_replicas(make_gateway: Callable[..., GatewayProcess], pg_dsn: str) -> None:
    a = make_gateway(DATABASE_URL=pg_dsn)
    b = make_gateway(DATABASE_URL=pg_dsn)
    old = a.create_key("team_grace")
    assert call(a, old).status_code == 200 and call(b, old).status_code == 200  # cached on both

    for bad in ({"graceSeconds": 604801}, {"graceSeconds": -1}, {"graceSeconds": "60"}, {"grace": 60}):
        assert httpx.post(f"{a.url}/tokens/{old}/refresh", json=bad).status_code == 400
    grace = 3
    rotated = httpx.post(f"{a.url}/tokens/{old}/refresh", json={"graceSeconds": grace})
    assert rotated.status_code == 200
    new = rotated.json()["apiKey"]
    (event,) = events(a, keyId=rotated.json()["keyId"], action="key.rotated")
    deadline = time.time() + grace - 0.2  # the server's deadline is at least this late
    until = event["changes"]["previousSecretUntil"]["after"]
    assert until is not None and event["actor"] == "key"

    # both secrets work on both replicas until the grace ends
    while time.time() < deadline - 0.3:
        assert [call(gw, key).status_code for gw in (a, b) for key in (old, new)] == [200] * 4
        time.sleep(0.1)
    # then the old one is refused everywhere within a second; the new one keeps working
    bound = deadline + 0.4 + 1.0 - time.time()  # the deadline was taken up to 0.4 s early
    for gw in (a, b):
        wait_until(lambda gw=gw: call(gw, old).status_code == 401, bound, f"{gw.url} refusing the old secret")  # type: ignore[misc]
        assert call(gw, new).status_code == 200
    assert httpx.get(f"{b.url}/tokens/{old}").status_code == 404

    # without graceSeconds, as before: the old secret stops at once
    newest = httpx.post(f"{b.url}/tokens/{new}/refresh").json()["apiKey"]
    wait_until(lambda: call(a, new).status_code == 401, 1, "the replica refusing the rotated secret")
    assert call(a, newest).status_code == 200


def test_revoking_by_the_previous_secret_revokes_the_key(gateway: GatewayProcess) -> None:
    old = gateway.create_key("team_grace_revoke")
    new = httpx.post(f"{gateway.url}/tokens/{old}/refresh", json={"graceSeconds": 600}).json()["apiKey"]
    assert call(gateway, old).status_code == 200 and call(gateway, new).status_code == 200
    assert httpx.get(f"{gateway.url}/tokens/{old}").json()["teamId"] == "team_grace_revoke"
    # only the current secret rotates
    assert httpx.post(f"{gateway.url}/tokens/{old}/refresh").status_code == 404
    assert httpx.delete(f"{gateway.url}/tokens/{old}", headers=ADMIN).status_code == 204
    assert call(gateway, old).status_code == 401 and call(gateway, new).status_code == 401


def test_every_change_is_audited_with_its_actor_and_no_secret(gateway: GatewayProcess, tmp_path: Path) -> None:
    team = "team_audited"
    created = create(gateway, teamId=team, name="Audited", allowedModels=["gpt-4o*"], expiresIn="30d")
    key, key_id = created["apiKey"], created["keyId"]
    by_key = httpx.post(f"{gateway.url}/tokens/{key}/refresh").json()["apiKey"]
    by_admin = httpx.post(f"{gateway.url}/tokens/{by_key}/refresh", headers=ADMIN).json()["apiKey"]
    httpx.patch(f"{gateway.url}/keys/{key_id}", json={"allowedProviders": ["openai"]}, headers=ADMIN)
    httpx.patch(f"{gateway.url}/teams/{team}", json={"allowedModels": ["gpt-*"]}, headers=ADMIN)
    other = create(gateway, teamId=team)
    assert httpx.delete(f"{gateway.url}/keys/{other['keyId']}", headers=ADMIN).status_code == 204
    assert httpx.delete(f"{gateway.url}/teams/{team}/keys", headers=ADMIN).json() == {"revoked": 1}

    trail = list(reversed(events(gateway, teamId=team)))  # oldest first
    assert [(e["action"], e["actor"], e["keyId"]) for e in trail] == [
        ("key.created", "admin-api", key_id),
        ("key.rotated", "key", key_id),
        ("key.rotated", "admin-api", key_id),
        ("key.updated", "admin-api", key_id),
        ("team.updated", "admin-api", None),
        ("key.created", "admin-api", other["keyId"]),
        ("key.revoked", "admin-api", other["keyId"]),
        ("key.revoked", "admin-api", key_id),
    ]
    first = trail[0]
    assert first["changes"]["allowedModels"] == {"before": None, "after": ["gpt-4o*"]}
    assert first["changes"]["name"] == {"before": None, "after": "Audited"}
    assert first["clientAddress"] == "127.0.0.1" and len(first["requestId"]) == 32
    assert trail[3]["changes"] == {"allowedProviders": {"before": None, "after": ["openai"]}}
    assert all(e["teamId"] == team and e["at"] >= created["createdAt"] for e in trail)

    # never a secret: not in the API's answer, not in the log's audit lines
    text = httpx.get(f"{gateway.url}/audit", params={"teamId": team}, headers=ADMIN).text
    logged = [line for line in gateway.log_lines() if line.get("event") == "audit"]
    assert {str(line["key_id"]) for line in logged} >= {key_id, other["keyId"]}
    everything = text + str(logged)
    for secret in (key, by_key, by_admin, other["apiKey"], ADMIN_KEY):
        assert secret not in everything and secret[3:] not in everything and secret[3:20] not in everything


def test_audit_filters_and_paging(gateway: GatewayProcess) -> None:
    team = "team_paged"
    ids = [create(gateway, teamId=team)["keyId"] for _ in range(3)]
    assert httpx.get(f"{gateway.url}/audit").status_code == 401
    page = httpx.get(f"{gateway.url}/audit", params={"teamId": team, "limit": "2"}, headers=ADMIN).json()
    assert [e["keyId"] for e in page["events"]] == [ids[2], ids[1]] and page["nextCursor"]
    rest = httpx.get(
        f"{gateway.url}/audit", params={"teamId": team, "limit": "2", "cursor": page["nextCursor"]}, headers=ADMIN
    ).json()
    assert [e["keyId"] for e in rest["events"]] == [ids[0]] and rest["nextCursor"] is None
    assert [e["keyId"] for e in events(gateway, keyId=ids[1])] == [ids[1]]
    assert events(gateway, teamId=team, action="key.revoked") == []
    assert len(events(gateway, teamId=team, **{"from": "2020-01-01", "to": "2999-01-01"})) == 3
    assert events(gateway, teamId=team, **{"to": "2020-01-01"}) == []
    for query in ({"action": "nope"}, {"from": "yesterday"}, {"limit": "0"}, {"cursor": "%%%"}, {"teamId": "\x1b"}):
        assert httpx.get(f"{gateway.url}/audit", params=query, headers=ADMIN).status_code == 400, query
    reversed_range = {"from": "2026-02-01", "to": "2026-01-01"}
    assert httpx.get(f"{gateway.url}/audit", params=reversed_range, headers=ADMIN).status_code == 400


def test_cli_changes_are_audited_as_cli(gateway: GatewayProcess) -> None:
    import subprocess

    env = {**gateway.env}
    created = subprocess.run(
        [str(BIN / "gateway"), "tokens", "create", "--team", "team_cli_audit", "--expires", "12h", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"expiresAt"' in created.stdout
    (event,) = events(gateway, teamId="team_cli_audit")
    assert event["actor"] == "cli" and event["clientAddress"] is None and "expiresAt" in event["changes"]
    listed = subprocess.run(
        [str(BIN / "gateway"), "audit", "--team", "team_cli_audit"], env=env, capture_output=True, text=True, check=True
    )
    assert "key.created" in listed.stdout and "cli" in listed.stdout


def test_limits_and_lists_change_in_one_patch_and_one_audit_event(gateway: GatewayProcess) -> None:
    key_id = create(gateway, teamId="team_both")["keyId"]
    body = {"limits": {"maxConcurrent": 3}, "allowedModels": ["gpt-4o*"], "expiresIn": "30d"}
    patched = httpx.patch(f"{gateway.url}/keys/{key_id}", json=body, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    shown = httpx.get(f"{gateway.url}/keys/{key_id}", headers=ADMIN).json()
    assert shown["limits"]["maxConcurrent"] == 3 and shown["allowedModels"] == ["gpt-4o*"] and shown["expiresAt"]
    (updated,) = events(gateway, keyId=key_id, action="key.updated")
    assert updated["actor"] == "admin-api" and set(updated["changes"]) == {"limits", "allowedModels", "expiresAt"}
    assert updated["changes"]["limits"]["before"]["maxConcurrent"] is None
    assert updated["changes"]["limits"]["after"]["maxConcurrent"] == 3

    bad = httpx.patch(
        f"{gateway.url}/keys/{key_id}", json={"limits": {"maxConcurrent": 0}, "allowedModels": []}, headers=ADMIN
    )
    assert bad.status_code == 400 and httpx.get(f"{gateway.url}/keys/{key_id}", headers=ADMIN).json()["allowedModels"]

    team = {"limits": {"requestsPerMinute": 60}, "allowedProviders": ["openai"]}
    team_patched = httpx.patch(f"{gateway.url}/teams/team_both", json=team, headers=ADMIN).json()
    assert team_patched["limits"]["requestsPerMinute"] == 60 and team_patched["allowedProviders"] == ["openai"]
    assert team_patched["keyCount"] == 1 and team_patched["updatedAt"] is not None
    (changed,) = events(gateway, teamId="team_both", action="team.updated")
    assert set(changed["changes"]) == {"limits", "allowedProviders"}
    listed = httpx.get(f"{gateway.url}/teams", headers=ADMIN).json()["teams"]
    assert [t["allowedProviders"] for t in listed if t["teamId"] == "team_both"] == [["openai"]]
