"""The OpenAPI document kept in the repo matches the live app: every route documented, every
documented response produced (and shaped as documented)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import pytest
from starlette.routing import Route

from config import Settings
from service.app import create_app
from service.core.ledger import LedgerRow
from service.core.store import SQLiteStore
from service.status import OPENAPI
from tests.postgres import TcpProxy
from tests.support import ADMIN_KEY, GatewayProcess, wait_until

SPEC = json.loads(OPENAPI.read_text())
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def documented() -> set[tuple[str, str, str]]:
    return {
        (path, method.upper(), status)
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
        for status in operation["responses"]
    }


def test_every_route_of_the_app_is_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    app = create_app(Settings(database_path=tmp_path / "g.db"))
    names = {
        "{api_key}": "{apiKey}",
        "{key_id}": "{keyId}",
        "{team_id:path}": "{teamId}",
        "{team_id:team}": "{teamId}",
        "{request_id}": "{requestId}",
    }

    def documented_path(path: str) -> str:
        for name, shown in names.items():
            path = path.replace(name, shown)
        return path

    routes = {
        (documented_path(route.path), method)
        for route in app.app.fallback.routes  # type: ignore[attr-defined]
        if isinstance(route, Route)
        for method in (route.methods or ()) - {"HEAD"}
    }
    assert routes == {(path, method) for path, method, _ in documented()}
    for schema in SPEC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def check(response: httpx.Response, path: str, method: str, produced: set[tuple[str, str, str]]) -> None:
    status = str(response.status_code)
    operation = SPEC["paths"][path][method.lower()]
    assert status in operation["responses"], f"{method} {path} answered an undocumented {status}"
    content = operation["responses"][status].get("content", {})
    media_type = response.headers.get("content-type", "").split(";")[0]
    if media_type == "text/csv":
        assert "text/csv" in content, f"{method} {path} answered undocumented CSV"
    elif "application/json" in content:
        schema = {**content["application/json"]["schema"], "components": SPEC["components"]}
        jsonschema.validate(response.json(), schema)
    elif not content:
        assert response.content == b""
    produced.add((path, method, status))


def check_usage(gateway: GatewayProcess, produced: set[tuple[str, str, str]]) -> None:
    """The usage routes, over ledger rows written through the store on the gateway's database."""
    url = gateway.url
    issued = httpx.post(f"{url}/tokens", json={"teamId": "team_doc_usage"}, headers=ADMIN).json()
    row = LedgerRow(
        request_id="req_doc_1",
        client_request_id="client-doc",
        at="2026-11-02T10:00:00.000Z",
        team_id="team_doc_usage",
        key_id=issued["keyId"],
        provider="openai",
        model="gpt-4o",
        status=200,
        input_tokens=1000,
        output_tokens=300,
        cache_read_tokens=None,
        cache_write_tokens=None,
        reasoning_tokens=None,
        cost_micro_usd=5000,
        duration_ms=810.5,
        ttfb_ms=120.25,
        complete=True,
    )

    async def record() -> None:
        store = SQLiteStore(Path(gateway.env["DATABASE_URL"].removeprefix("sqlite:///")))
        await store.open()
        try:
            await store.record_usage([row, row._replace(request_id="req_doc_2", model=None, cost_micro_usd=None)])
        finally:
            await store.close()

    asyncio.run(record())
    window = {"from": "2026-11-01", "to": "2026-11-03T00:00:00Z"}
    for query in ({**window, "groupBy": "hour,team,key,provider,model"}, {**window, "format": "csv"}, {}):
        check(httpx.get(f"{url}/usage", params=query, headers=ADMIN), "/usage", "GET", produced)
    check(httpx.get(f"{url}/usage", params={"groupBy": "week"}, headers=ADMIN), "/usage", "GET", produced)
    check(httpx.get(f"{url}/usage"), "/usage", "GET", produced)
    path = "/usage/requests/{requestId}"
    check(httpx.get(f"{url}/usage/requests/req_doc_1", headers=ADMIN), path, "GET", produced)
    check(httpx.get(f"{url}/usage/requests/req_doc_2", headers=ADMIN), path, "GET", produced)
    check(httpx.get(f"{url}/usage/requests/req_doc_1"), path, "GET", produced)
    check(httpx.get(f"{url}/usage/requests/req_nope", headers=ADMIN), path, "GET", produced)
    path = "/tokens/{apiKey}/usage"
    own = httpx.get(f"{url}/tokens/{issued['apiKey']}/usage", params=window)
    assert own.json()["totals"]["requests"] == 2
    check(own, path, "GET", produced)
    check(httpx.get(f"{url}/tokens/{issued['apiKey']}/usage", params={"from": "2026-11-31"}), path, "GET", produced)
    check(httpx.get(f"{url}/tokens/sk_nope/usage"), path, "GET", produced)


def check_limits(url: str, key_id: str, produced: set[tuple[str, str, str]]) -> None:
    """The team and key limit routes, on a gateway of one process (limits in memory)."""
    check(httpx.get(f"{url}/teams", headers=ADMIN), "/teams", "GET", produced)
    check(httpx.get(f"{url}/teams?limit=0", headers=ADMIN), "/teams", "GET", produced)
    check(httpx.get(f"{url}/teams"), "/teams", "GET", produced)
    team = "/teams/{teamId}"
    limits = {"limits": {"requestsPerMinute": 100, "budgetUsd": 5}}
    patched = httpx.patch(f"{url}/teams/team_doc", json=limits, headers=ADMIN)
    assert patched.json()["limits"]["budgetPeriod"] == "month"
    check(patched, team, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_doc", json={"limit": {}}, headers=ADMIN), team, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_doc", json=limits), team, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_nobody", json={}, headers=ADMIN), team, "PATCH", produced)
    check(httpx.get(f"{url}/teams/team_doc", headers=ADMIN), team, "GET", produced)
    check(httpx.get(f"{url}/teams/team_doc"), team, "GET", produced)
    check(httpx.get(f"{url}/teams/team_nobody", headers=ADMIN), team, "GET", produced)
    check(httpx.get(f"{url}/teams/%1B", headers=ADMIN), team, "GET", produced)
    check(httpx.get(f"{url}/teams", headers=ADMIN), "/teams", "GET", produced)
    key = "/keys/{keyId}"
    check(
        httpx.patch(f"{url}/keys/{key_id}", json={"limits": {"maxConcurrent": 3}}, headers=ADMIN),
        key,
        "PATCH",
        produced,
    )
    check(
        httpx.patch(f"{url}/keys/{key_id}", json={"limits": {"maxConcurrent": 0}}, headers=ADMIN),
        key,
        "PATCH",
        produced,
    )
    check(httpx.patch(f"{url}/keys/{key_id}", json={"limits": {}}), key, "PATCH", produced)
    check(httpx.patch(f"{url}/keys/key_0000000000000000", json={}, headers=ADMIN), key, "PATCH", produced)
    check(httpx.get(f"{url}/keys/{key_id}", headers=ADMIN), key, "GET", produced)


def check_governance(gateway: GatewayProcess, produced: set[tuple[str, str, str]]) -> None:
    """Allow-lists, expiry, rotation grace, team settings and the audit trail."""
    url = gateway.url
    issued = httpx.post(
        f"{url}/tokens",
        json={
            "teamId": "team_doc_gov",
            "allowedModels": ["gpt-4o*"],
            "allowedProviders": ["openai"],
            "expiresIn": "30d",
        },
        headers=ADMIN,
    )
    check(issued, "/tokens", "POST", produced)
    key, key_id = issued.json()["apiKey"], issued.json()["keyId"]
    path = "/tokens/{apiKey}/refresh"
    check(httpx.post(f"{url}/tokens/{key}/refresh", json={"graceSeconds": -1}), path, "POST", produced)
    check(httpx.post(f"{url}/tokens/{key}/refresh", content=b" " * 70_000), path, "POST", produced)
    rotated = httpx.post(f"{url}/tokens/{key}/refresh", json={"graceSeconds": 60})
    check(rotated, path, "POST", produced)
    check(httpx.get(f"{url}/tokens/{key}"), "/tokens/{apiKey}", "GET", produced)  # the previous secret, in grace
    path = "/keys/{keyId}"
    check(httpx.patch(f"{url}/keys/{key_id}", json={"expiresAt": None}, headers=ADMIN), path, "PATCH", produced)
    check(httpx.get(f"{url}/keys/{key_id}", headers=ADMIN), path, "GET", produced)
    check(httpx.patch(f"{url}/keys/{key_id}", json={"nope": 1}, headers=ADMIN), path, "PATCH", produced)
    check(httpx.patch(f"{url}/keys/{key_id}", json={}), path, "PATCH", produced)
    check(httpx.patch(f"{url}/keys/key_0000000000000000", json={}, headers=ADMIN), path, "PATCH", produced)
    check(httpx.patch(f"{url}/keys/{key_id}", content=b" " * 70_000, headers=ADMIN), path, "PATCH", produced)
    path = "/teams/{teamId}"
    check(httpx.get(f"{url}/teams/team_doc_gov", headers=ADMIN), path, "GET", produced)
    check(httpx.get(f"{url}/teams/%20", headers=ADMIN), path, "GET", produced)
    check(httpx.get(f"{url}/teams/team_doc_gov"), path, "GET", produced)
    check(httpx.get(f"{url}/teams/team_doc_nobody", headers=ADMIN), path, "GET", produced)
    team = {"allowedModels": ["gpt-*"], "allowedProviders": None}
    check(httpx.patch(f"{url}/teams/team_doc_gov", json=team, headers=ADMIN), path, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_doc_gov", json={"expiresIn": "1d"}, headers=ADMIN), path, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_doc_gov", json=team), path, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/a%0Ab", json=team, headers=ADMIN), path, "PATCH", produced)
    check(httpx.patch(f"{url}/teams/team_doc_gov", content=b" " * 70_000, headers=ADMIN), path, "PATCH", produced)
    page = httpx.get(f"{url}/audit", params={"teamId": "team_doc_gov", "limit": "2"}, headers=ADMIN)
    assert page.json()["nextCursor"] is not None
    check(page, "/audit", "GET", produced)
    check(httpx.get(f"{url}/audit", params={"action": "nope"}, headers=ADMIN), "/audit", "GET", produced)
    check(httpx.get(f"{url}/audit"), "/audit", "GET", produced)


def test_every_documented_response_is_produced(
    gateway: GatewayProcess, make_gateway: Callable[..., GatewayProcess], pg_dsn: str, pg_proxy: TcpProxy
) -> None:
    produced: set[tuple[str, str, str]] = set()
    url = gateway.url
    key = httpx.post(f"{url}/tokens", json={"teamId": "team_doc"}, headers=ADMIN)
    check(key, "/tokens", "POST", produced)
    api_key = key.json()["apiKey"]
    check(httpx.post(f"{url}/tokens", content=b"{", headers=ADMIN), "/tokens", "POST", produced)
    check(httpx.post(f"{url}/tokens", json={"teamId": "t"}), "/tokens", "POST", produced)
    check(httpx.post(f"{url}/tokens", content=b" " * 70_000, headers=ADMIN), "/tokens", "POST", produced)
    check(httpx.get(f"{url}/tokens", headers=ADMIN), "/tokens", "GET", produced)
    check(httpx.get(f"{url}/tokens?limit=0", headers=ADMIN), "/tokens", "GET", produced)
    check(httpx.get(f"{url}/tokens"), "/tokens", "GET", produced)
    check(httpx.get(f"{url}/tokens/{api_key}"), "/tokens/{apiKey}", "GET", produced)
    check(httpx.get(f"{url}/tokens/sk_nope"), "/tokens/{apiKey}", "GET", produced)
    rotated = httpx.post(f"{url}/tokens/{api_key}/refresh")
    check(rotated, "/tokens/{apiKey}/refresh", "POST", produced)
    check(httpx.post(f"{url}/tokens/{api_key}/refresh"), "/tokens/{apiKey}/refresh", "POST", produced)
    new_key = rotated.json()["apiKey"]
    key_id = rotated.json()["keyId"]
    check(httpx.get(f"{url}/tokens?teamId=team_doc", headers=ADMIN), "/tokens", "GET", produced)
    check(httpx.get(f"{url}/keys/{key_id}", headers=ADMIN), "/keys/{keyId}", "GET", produced)
    check(httpx.get(f"{url}/keys/{key_id}"), "/keys/{keyId}", "GET", produced)
    check(httpx.get(f"{url}/keys/key_0000000000000000", headers=ADMIN), "/keys/{keyId}", "GET", produced)
    check_limits(url, key_id, produced)
    other = httpx.post(f"{url}/tokens", json={"teamId": "team_doc_2"}, headers=ADMIN).json()
    check(httpx.delete(f"{url}/keys/{other['keyId']}"), "/keys/{keyId}", "DELETE", produced)
    check(httpx.delete(f"{url}/keys/{other['keyId']}", headers=ADMIN), "/keys/{keyId}", "DELETE", produced)
    check(httpx.delete(f"{url}/keys/{other['keyId']}", headers=ADMIN), "/keys/{keyId}", "DELETE", produced)
    httpx.post(f"{url}/tokens", json={"teamId": "team_doc_3"}, headers=ADMIN)
    check(httpx.delete(f"{url}/teams/team_doc_3/keys"), "/teams/{teamId}/keys", "DELETE", produced)
    check(httpx.delete(f"{url}/teams/team_doc_3/keys", headers=ADMIN), "/teams/{teamId}/keys", "DELETE", produced)
    check(httpx.delete(f"{url}/teams/%1B/keys", headers=ADMIN), "/teams/{teamId}/keys", "DELETE", produced)
    check(httpx.delete(f"{url}/teams/a%0Ab/keys", headers=ADMIN), "/teams/{teamId}/keys", "DELETE", produced)
    check(httpx.delete(f"{url}/tokens/{new_key}"), "/tokens/{apiKey}", "DELETE", produced)
    check(httpx.delete(f"{url}/tokens/{new_key}", headers=ADMIN), "/tokens/{apiKey}", "DELETE", produced)
    check(httpx.delete(f"{url}/tokens/{new_key}", headers=ADMIN), "/tokens/{apiKey}", "DELETE", produced)
    check_usage(gateway, produced)
    check_governance(gateway, produced)
    check(httpx.get(f"{url}/healthz"), "/healthz", "GET", produced)
    check(httpx.get(f"{url}/readyz"), "/readyz", "GET", produced)
    check(httpx.get(f"{url}/metrics"), "/metrics", "GET", produced)
    check(httpx.get(f"{url}/metrics", headers=ADMIN), "/metrics", "GET", produced)
    served = httpx.get(f"{url}/openapi.json")
    check(served, "/openapi.json", "GET", produced)
    assert served.json() == SPEC

    no_admin = make_gateway(ADMIN_API_KEY="", SELF_SERVICE_ROTATION="false")
    check(httpx.post(f"{no_admin.url}/tokens", json={"teamId": "t"}, headers=ADMIN), "/tokens", "POST", produced)
    check(httpx.get(f"{no_admin.url}/metrics"), "/metrics", "GET", produced)
    check(httpx.get(f"{no_admin.url}/usage", headers=ADMIN), "/usage", "GET", produced)
    refresh = f"/tokens/sk_{'0' * 64}/refresh"
    check(httpx.post(no_admin.url + refresh), "/tokens/{apiKey}/refresh", "POST", produced)
    admin_rotation = make_gateway(SELF_SERVICE_ROTATION="false")
    check(httpx.post(admin_rotation.url + refresh), "/tokens/{apiKey}/refresh", "POST", produced)

    outage = make_gateway(DATABASE_URL=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}"))
    # PostgreSQL (replicas) without REDIS_URL: limits could not be exact, so none may be set
    unshared_key = httpx.post(f"{outage.url}/tokens", json={"teamId": "t"}, headers=ADMIN).json()["keyId"]
    limits = {"limits": {"maxConcurrent": 2}}
    conflict = httpx.patch(f"{outage.url}/teams/t", json=limits, headers=ADMIN)
    assert "REDIS_URL" in conflict.json()["error"]
    check(conflict, "/teams/{teamId}", "PATCH", produced)
    check(
        httpx.patch(f"{outage.url}/keys/{unshared_key}", json=limits, headers=ADMIN), "/keys/{keyId}", "PATCH", produced
    )
    pg_proxy.down()
    wait_until(lambda: httpx.get(f"{outage.url}/readyz").status_code == 503, 10, "the outage noticed")
    check(httpx.post(f"{outage.url}/tokens", json={"teamId": "t"}, headers=ADMIN), "/tokens", "POST", produced)
    check(httpx.get(f"{outage.url}/readyz"), "/readyz", "GET", produced)
    check(httpx.get(f"{outage.url}/usage", headers=ADMIN), "/usage", "GET", produced)
    pg_proxy.up()

    assert produced == documented()
