"""The admin console over plain HTTP, against real gateway processes: its security headers, the
session cookie, CSRF and origin checks, slowed and limited sign-ins, bad input shown as pages
(never a 500), the failures panel, a store outage, and ``ADMIN_CONSOLE=false``."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest

from service.console.session import MAX_FAILURES
from tests.postgres import TcpProxy
from tests.support import ADMIN_KEY, GatewayProcess, wait_until

PAGES = ["/admin", "/admin/keys", "/admin/teams", "/admin/usage", "/admin/status", "/admin/audit"]


def signed_in(gateway: GatewayProcess, **headers: str) -> httpx.Client:
    client = httpx.Client(base_url=gateway.url, headers=headers)
    response = client.post("/admin/login", data={"admin_key": ADMIN_KEY})
    assert response.status_code == 303 and response.headers["location"] == "/admin", response.text
    return client


def csrf(client: httpx.Client) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', client.get("/admin/keys").text)
    assert match is not None
    return match.group(1)


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    signed = signed_in(gateway)
    yield signed
    signed.close()


def test_every_answer_carries_the_security_headers_and_no_inline_code(
    gateway: GatewayProcess, client: httpx.Client
) -> None:
    gateway.create_key("team_headers", "Headers")
    answers = [httpx.get(f"{gateway.url}/admin/login"), client.get("/admin/nope"), client.get("/admin")]
    answers += [client.get(path) for path in [*PAGES, "/admin/teams/team_headers"]]
    for response in answers:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        page = response.text
        assert "<style" not in page and " style=" not in page
        assert not re.search(r"<[^>]*\son[a-z]+=", page), "an inline event handler"
        assert all(src for src in re.findall(r"<script([^>]*)>", page)), "a script without src"
        for asset in re.findall(r'(?:src|href)="(/admin/static/[^"]+)"', page):
            static = client.get(asset)
            assert static.status_code == 200
            assert static.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert "frame-ancestors 'none'" in static.headers["content-security-policy"]
    assert client.get("/admin/static/nope.js").status_code == 404


def test_the_session_cookie_and_its_refusals(
    gateway: GatewayProcess, make_gateway: Callable[..., GatewayProcess]
) -> None:
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get("/admin").headers["location"] == "/admin/login"
        assert anonymous.post("/admin/keys", data={"teamId": "t"}).status_code == 403
        response = anonymous.post("/admin/login", data={"admin_key": ADMIN_KEY})
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("gateway_console=") and ADMIN_KEY not in cookie
        for attribute in ("HttpOnly", "Max-Age=28800", "Path=/admin", "SameSite=strict"):
            assert attribute in cookie
        assert "Secure" not in cookie  # plain HTTP, and no trusted proxy saying otherwise
        assert anonymous.get("/admin/login").headers["location"] == "/admin"  # already signed in
        value = anonymous.cookies["gateway_console"]
        anonymous.cookies.set(
            "gateway_console", value[:-2] + ("AA" if not value.endswith("AA") else "BB"), path="/admin"
        )
        assert anonymous.get("/admin").status_code == 303  # tampered: sign in again
        anonymous.cookies.set("gateway_console", "x" * 600, path="/admin")
        assert anonymous.get("/admin").status_code == 303

    # behind a trusted proxy that says HTTPS, the cookie is Secure; a session signed with another
    # secret is refused
    proxied = make_gateway(TRUSTED_PROXIES="127.0.0.1", CONSOLE_SESSION_SECRET="s" * 40)
    response = httpx.post(
        f"{proxied.url}/admin/login", data={"admin_key": ADMIN_KEY}, headers={"x-forwarded-proto": "https"}
    )
    assert "Secure" in response.headers["set-cookie"]
    foreign = httpx.Client(base_url=proxied.url, cookies={"gateway_console": value})
    assert foreign.get("/admin").status_code == 303


def test_changes_need_the_csrf_token_and_the_same_origin(gateway: GatewayProcess, client: httpx.Client) -> None:
    token = csrf(client)
    assert client.post("/admin/keys", data={"teamId": "team_csrf"}).status_code == 403
    assert client.post("/admin/keys", data={"teamId": "team_csrf", "csrf_token": "0" * 64}).status_code == 403
    cross = client.post(
        "/admin/keys", data={"teamId": "team_csrf", "csrf_token": token}, headers={"sec-fetch-site": "cross-site"}
    )
    assert cross.status_code == 403
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_csrf"}, headers=admin).json()["tokens"] == []
    created = client.post("/admin/keys", data={"teamId": "team_csrf", "csrf_token": token})
    assert created.status_code == 201 and "Copy this key now" in created.text
    listed = httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_csrf"}, headers=admin).json()["tokens"]
    assert [key["name"] for key in listed] == ["team_csrf"]
    signed_out = client.post("/admin/logout", data={"csrf_token": token})
    assert signed_out.status_code == 303 and 'gateway_console=""' in signed_out.headers["set-cookie"]


def test_bad_input_is_a_page_with_the_right_status(gateway: GatewayProcess, client: httpx.Client) -> None:
    token = csrf(client)
    for form, status, message in [
        ({"teamId": ""}, 400, "&#39;teamId&#39; must not be empty."),
        ({"teamId": "a\x1bb"}, 400, "must not contain control characters"),
        ({"teamId": "t" * 129}, 400, "at most 128 characters"),
        ({"teamId": "t", "name": "n" * 257}, 400, "at most 256 characters"),
    ]:
        response = client.post("/admin/keys", data={**form, "csrf_token": token})
        assert response.status_code == status and message in response.text, response.text
    big = client.post("/admin/keys", data={"teamId": "t", "csrf_token": token, "pad": "x" * 20_000})
    assert big.status_code == 413
    as_json = client.post("/admin/keys", json={"teamId": "t", "csrf_token": token})
    assert as_json.status_code == 400
    for path, status in [
        ("/admin/usage?from=yesterday", 400),
        ("/admin/usage?groupBy=week", 400),
        ("/admin/usage?from=2026-11-02&to=2026-11-01", 400),
        ("/admin/usage?measure=joy", 400),
        ("/admin/usage?teamId=%1B", 400),
        ("/admin/usage.csv?groupBy=week", 400),
        ("/admin/keys?state=lost", 400),
        ("/admin/keys?page=0", 400),
        ("/admin/keys?team=%1B", 400),
        ("/admin/teams/%1B", 400),
        ("/admin/teams/team_nobody", 404),
        ("/admin/keys/key_0000000000000000/rotate", 404),
        ("/admin/keys/nonsense/revoke", 404),
        ("/admin/anything/else", 404),
    ]:
        response = client.get(path)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"].startswith("text/html") and "Traceback" not in response.text
    assert client.post("/admin/keys/key_0000000000000000/revoke", data={"csrf_token": token}).status_code == 404


def test_the_team_limits_form(gateway: GatewayProcess, client: httpx.Client) -> None:
    """The limits form goes through PATCH /teams/{teamId}'s checks: its refusals are 400 pages with the
    API's own messages and write nothing; what it saves is what the API reads; empty fields clear."""
    gateway.create_key("team_limits", "Limits")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    def api_limits() -> dict[str, object]:
        answer = httpx.get(f"{gateway.url}/teams/team_limits", headers=admin)
        assert answer.status_code == 200, answer.text
        limits: dict[str, object] = answer.json()["limits"]
        return limits

    cleared = dict.fromkeys(("requestsPerMinute", "tokensPerMinute", "maxConcurrent", "budgetUsd", "budgetPeriod"))
    path = "/admin/teams/team_limits"
    token = csrf(client)
    form = {"form": "limits", "requestsPerMinute": "600", "tokensPerMinute": "", "maxConcurrent": "8"}
    form |= {"budgetUsd": "25.5", "budgetPeriod": "week"}
    assert client.post(path, data=form).status_code == 403
    assert client.post(path, data={**form, "csrf_token": "0" * 64}).status_code == 403
    for field, value, message in [
        ("requestsPerMinute", "0", "'limits.requestsPerMinute' must be a whole number from 1 to"),
        ("tokensPerMinute", "many", "'limits.tokensPerMinute' must be a whole number from 1 to"),
        ("maxConcurrent", "2.5", "'limits.maxConcurrent' must be a whole number from 1 to"),
        ("maxConcurrent", "9" * 5000, "'limits.maxConcurrent' must be a whole number from 1 to"),
        ("budgetUsd", "ten", "'limits.budgetUsd' must be a number of US dollars"),
        ("budgetUsd", "0.0000001", "'limits.budgetUsd' must be a number of US dollars"),
        ("budgetUsd", "-1", "'limits.budgetUsd' must be a number of US dollars"),
        ("budgetUsd", "1e999", "'limits.budgetUsd' must be a number of US dollars"),
        ("budgetUsd", "NaN", "'limits.budgetUsd' must be a number of US dollars"),
        ("budgetPeriod", "fortnight", "'limits.budgetPeriod' must be one of day, week, month, total"),
    ]:
        response = client.post(path, data={**form, field: value, "csrf_token": token})
        assert response.status_code == 400, (field, value[:20], response.text)
        page = html.unescape(response.text)
        assert message in page and 'role="alert"' in page and "Traceback" not in page
        assert field == "budgetPeriod" or f'value="{value}"' in page  # the form keeps what was typed
    for which in ("", "budget"):  # the page's two forms are told apart by their hidden field
        response = client.post(path, data={**form, "form": which, "csrf_token": token})
        assert response.status_code == 400 and "must be one of limits, allow-lists" in html.unescape(response.text)
    assert api_limits() == cleared

    saved = client.post(path, data={**form, "csrf_token": token})
    assert saved.status_code == 303 and saved.headers["location"] == f"{path}?saved=limits"
    expected = {**cleared, "requestsPerMinute": 600, "maxConcurrent": 8, "budgetUsd": 25.5, "budgetPeriod": "week"}
    assert api_limits() == expected
    shown = client.get(saved.headers["location"]).text
    assert "Limits saved" in shown and 'value="25.5"' in shown and '<option value="week" selected>' in shown
    spent = httpx.get(f"{gateway.url}/teams/team_limits", headers=admin).json()["state"]["spentUsd"]
    teams = client.get("/admin/teams").text
    assert '<td data-limits="team_limits">600 requests/min, 8 at once, $25.50 a week</td>' in teams
    bar = re.search(r'<meter [^>]*max="([^"]+)" value="([^"]+)"[^>]*data-budget="team_limits"', teams)
    assert bar is not None and (float(bar.group(1)), float(bar.group(2))) == (25.5, spent)
    assert 'data-budget="team_limits"' in client.get("/admin").text  # among the teams nearest their budgets

    # a key's limits (set through the API) are shown on the keys page
    key_id = httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_limits"}, headers=admin).json()["tokens"][0]
    patched = httpx.patch(
        f"{gateway.url}/keys/{key_id['keyId']}", json={"limits": {"tokensPerMinute": 5000}}, headers=admin
    )
    assert patched.status_code == 200, patched.text
    keys = client.get("/admin/keys", params={"team": "team_limits"}).text
    assert f'<td data-limits="{key_id["keyId"]}">5,000 tokens/min</td>' in keys

    # a budget without a period runs per month; empty fields clear every limit
    client.post(path, data={"form": "limits", "budgetUsd": "3", "csrf_token": token})
    assert api_limits() == {**cleared, "budgetUsd": 3.0, "budgetPeriod": "month"}
    assert client.post(path, data={"form": "limits", "csrf_token": token}).status_code == 303
    assert api_limits() == cleared
    assert 'data-budget="team_limits"' not in client.get("/admin/teams").text
    assert client.post("/admin/teams/team_nobody", data={**form, "csrf_token": token}).status_code == 404


@pytest.mark.parametrize("kind", ["team", "key"])
def test_the_allow_lists_forms(gateway: GatewayProcess, client: httpx.Client, kind: str) -> None:
    """A team's allow-lists on its page, and a key's on its own page, go through PATCH /teams/{teamId}
    (PATCH /keys/{keyId}): what the API refuses is a 400 page with its message, the form keeping what
    was typed and nothing written; what is saved is one audit event and is enforced at once; empty
    fields clear the lists. The team id holds a slash, as team ids may."""
    team = f"team/allow-{kind}"
    key = gateway.create_key(team, "Allowed")
    key_id = httpx.get(f"{gateway.url}/tokens/{key}").json()["keyId"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    if kind == "team":
        path, api = f"/admin/teams/{team}", f"{gateway.url}/teams/{quote(team, safe='')}"
        saved_at, hidden = f"/admin/teams/{quote(team, safe='')}?saved=allow-lists", {"form": "allow-lists"}
    else:
        path, api = f"/admin/keys/{key_id}/allow-lists", f"{gateway.url}/keys/{key_id}"
        saved_at, hidden = "/admin/keys?" + urlencode({"team": team, "saved": key_id}), {}
        assert f'href="{path}"' in client.get("/admin/keys", params={"team": team}).text

    def api_lists() -> tuple[object, object]:
        shown = httpx.get(api, headers=admin).json()
        return shown["allowedModels"], shown["allowedProviders"]

    def updates() -> list[dict[str, Any]]:
        query = {"teamId": team, "action": f"{kind}.updated"}
        found: list[dict[str, Any]] = httpx.get(f"{gateway.url}/audit", params=query, headers=admin).json()["events"]
        return found

    def call(model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        auth = {"authorization": f"Bearer {key}"}
        return httpx.post(f"{gateway.url}/openai/v1/chat/completions", json=body, headers=auth).status_code

    token = csrf(client)
    page = client.get(path)
    assert page.status_code == 200 and '<label for="allowedModels">Allowed models</label>' in page.text
    form = {**hidden, "allowedModels": "gpt-4o-mini\nclaude-*", "allowedProviders": "openai, anthropic"}
    assert client.post(path, data=form).status_code == 403
    assert client.post(path, data={**form, "csrf_token": "0" * 64}).status_code == 403
    for field, value, message in [
        ("allowedModels", "gpt-4o, " + "m" * 257, "'allowedModels' entries must be at most 256 characters."),
        ("allowedModels", "gpt-\x074o", "'allowedModels' entries must be non-empty strings of printable characters."),
        ("allowedModels", " ".join(f"m{n}" for n in range(101)), "'allowedModels' must have at most 100 entries."),
        ("allowedProviders", "openai, nowhere", "'allowedProviders': unknown provider 'nowhere' (known: "),
        ("allowedProviders", "OpenAI", "'allowedProviders' entries must be provider slugs such as 'openai'."),
    ]:
        response = client.post(path, data={**form, field: value, "csrf_token": token})
        assert response.status_code == 400, (field, value[:20], response.text)
        shown = html.unescape(response.text)
        assert message in shown and 'role="alert"' in shown and "Traceback" not in shown
        assert f'value="{value}"' in shown and 'aria-invalid="true"' in shown  # the form keeps what was typed
    assert api_lists() == (None, None) and updates() == []
    assert call("gpt-4o") == 200

    saved = client.post(path, data={**form, "csrf_token": token})
    assert saved.status_code == 303 and saved.headers["location"] == saved_at
    assert api_lists() == (["gpt-4o-mini", "claude-*"], ["openai", "anthropic"])
    (event,) = updates()
    assert event["actor"] == "admin-api" and event["changes"] == {
        "allowedModels": {"before": None, "after": ["gpt-4o-mini", "claude-*"]},
        "allowedProviders": {"before": None, "after": ["openai", "anthropic"]},
    }
    assert call("gpt-4o") == 403 and call("gpt-4o-mini") == 200
    shown = client.get(saved_at).text
    assert re.search(r'<p class="notice" role="status">Allow-lists (of key <code>key_[0-9a-z]+</code> )?saved', shown)
    assert "models: gpt-4o-mini, claude-*; providers: openai, anthropic" in shown
    assert 'value="gpt-4o-mini, claude-*"' in client.get(path).text  # the form shows the lists to edit

    # the same lists again change nothing and record nothing; empty fields clear both lists
    assert client.post(path, data={**form, "csrf_token": token}).status_code == 303 and len(updates()) == 1
    cleared = client.post(path, data={**hidden, "allowedModels": " ", "allowedProviders": "", "csrf_token": token})
    assert cleared.status_code == 303 and api_lists() == (None, None)
    assert updates()[0]["changes"]["allowedModels"] == {"before": ["gpt-4o-mini", "claude-*"], "after": None}
    assert call("gpt-4o") == 200
    if kind == "team":  # the limits form beside it still sets the limits alone
        limits = client.post(path, data={"form": "limits", "maxConcurrent": "2", "csrf_token": token})
        assert limits.status_code == 303 and api_lists() == (None, None)
        assert httpx.get(api, headers=admin).json()["limits"]["maxConcurrent"] == 2
    else:
        unknown = client.post("/admin/keys/key_0000000000000000/allow-lists", data={**form, "csrf_token": token})
        assert unknown.status_code == 404


def test_budgets_while_the_limits_store_is_unreachable(make_gateway: Callable[..., GatewayProcess]) -> None:
    """Redis down: the budget is shown, its spent said to be unknown, never a 500."""
    gateway = make_gateway(REDIS_URL="redis://127.0.0.1:9/0")
    gateway.create_key("team_no_redis", "No Redis")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    patched = httpx.patch(f"{gateway.url}/teams/team_no_redis", json={"limits": {"budgetUsd": 4}}, headers=admin)
    assert patched.status_code == 200 and patched.json()["state"] is None, patched.text
    client = signed_in(gateway)
    for path in ("/admin", "/admin/teams", "/admin/teams/team_no_redis"):
        page = client.get(path)
        assert page.status_code == 200 and "spent not counted" in page.text, path
    client.close()


def test_the_keys_filters_and_the_usage_csv(gateway: GatewayProcess, client: httpx.Client) -> None:
    gateway.create_key("team_filters", "Filtered")
    team_page = client.get("/admin/keys", params={"team": "team_filters"})
    assert team_page.status_code == 200 and team_page.text.count('data-key-id="') == 1
    assert "No keys match these filters" in client.get("/admin/keys", params={"state": "idle"}).text
    assert "No keys match these filters" in client.get("/admin/keys", params={"state": "expired"}).text
    key_id = httpx.get(f"{gateway.url}/tokens/{gateway.keys[-1]}").json()["keyId"]
    ended = httpx.patch(
        f"{gateway.url}/keys/{key_id}",
        json={"expiresAt": "2020-01-01"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert ended.status_code == 200, ended.text
    expired = client.get("/admin/keys", params={"state": "expired"}).text
    assert expired.count('data-key-id="') == 1 and f'data-key-id="{key_id}"' in expired
    assert (
        '<time datetime="2020-01-01T00:00:00.000Z">2020-01-01 00:00</time> <span class="tag warn">expired</span>'
        in expired
    )
    csv = client.get("/admin/usage.csv", params={"groupBy": ["day", "team"], "teamId": "team_filters"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.headers["content-disposition"].startswith('attachment; filename="usage-')
    assert csv.text.splitlines()[0].startswith("day,teamId,requests")


def test_failed_sign_ins_are_slowed_then_refused(make_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = make_gateway()
    login = f"{gateway.url}/admin/login"
    with ThreadPoolExecutor(MAX_FAILURES) as pool:
        statuses = list(
            pool.map(lambda n: httpx.post(login, data={"admin_key": f"guess-{n}"}).status_code, range(MAX_FAILURES))
        )
    assert statuses == [401] * MAX_FAILURES
    refused = httpx.post(login, data={"admin_key": ADMIN_KEY})  # even the right key, until the window ends
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "Too many failed sign-ins" in refused.text
    lines = [line for line in gateway.log_lines() if str(line.get("event", "")).startswith("console_sign_in")]
    assert {line["event"] for line in lines} == {"console_sign_in_failed", "console_sign_in_throttled"}
    assert ADMIN_KEY not in gateway.log_text() and "guess-" not in gateway.log_text()


def test_the_overview_lists_the_last_hours_failures(gateway: GatewayProcess, client: httpx.Client) -> None:
    key = gateway.create_key("team_failures", "Failures")
    for status in (503, 500):
        answer = httpx.get(f"{gateway.url}/openai/_mock/status/{status}", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == status

    def listed() -> bool:
        page = client.get("/admin").text
        return "<td>503</td><td>upstream failure</td>" in page and "<td>500</td><td>error</td>" in page

    wait_until(listed, 10, "both failures on the overview")


def test_console_off_and_console_without_admin_key(make_gateway: Callable[..., GatewayProcess]) -> None:
    off = make_gateway(ADMIN_CONSOLE="false")
    for path in ("/admin", "/admin/login", "/admin/static/console.css"):
        response = httpx.get(off.url + path)
        assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    no_admin = make_gateway(ADMIN_API_KEY="")
    page = httpx.get(f"{no_admin.url}/admin/login")
    assert page.status_code == 403 and "ADMIN_API_KEY" in page.text
    assert httpx.get(f"{no_admin.url}/admin").headers["location"] == "/admin/login"


def test_a_store_outage_is_a_503_page(
    make_gateway: Callable[..., GatewayProcess], pg_dsn: str, pg_proxy: TcpProxy
) -> None:
    gateway = make_gateway(DATABASE_URL=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}"))
    client = signed_in(gateway)
    try:
        assert client.get("/admin/status").status_code == 200
        pg_proxy.down()
        wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 503, 10, "the outage noticed")
        for path in ("/admin", "/admin/keys"):
            response = client.get(path)
            assert response.status_code == 503 and "unreachable" in response.text
        status = client.get("/admin/status")
        assert status.status_code == 200 and "unreachable" in status.text
    finally:
        pg_proxy.up()
        client.close()


def test_keys_with_expiry_allow_lists_and_a_rotation_grace(gateway: GatewayProcess, client: httpx.Client) -> None:
    token = csrf(client)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for form, message in [
        ({"expiresIn": "soon"}, "&#39;expiresIn&#39; must be a duration like 30d"),
        ({"allowedProviders": "nowhere"}, "nowhere"),
        ({"allowedModels": "gpt-4o, " + "m" * 257}, "&#39;allowedModels&#39; entries must be at most 256 characters"),
    ]:
        refused = client.post("/admin/keys", data={"teamId": "team_gov", "csrf_token": token, **form})
        assert refused.status_code == 400 and message in refused.text, refused.text
    assert httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_gov"}, headers=admin).json()["tokens"] == []
    form = {"teamId": "team_gov", "expiresIn": "30d", "allowedModels": "gpt-4o*,\n o3,", "allowedProviders": "openai"}
    created = client.post("/admin/keys", data={**form, "csrf_token": token})
    assert created.status_code == 201, created.text
    key = re.search(r'value="(sk_[0-9a-f]{64})"', created.text)
    key_id = re.search(r"Key <code>(key_[0-9a-z]+)</code>", created.text)
    assert key is not None and key_id is not None
    shown = httpx.get(f"{gateway.url}/keys/{key_id[1]}", headers=admin).json()
    assert shown["allowedModels"] == ["gpt-4o*", "o3"] and shown["allowedProviders"] == ["openai"]
    assert shown["expiresAt"] is not None and shown["expired"] is False
    listing = client.get("/admin/keys", params={"team": "team_gov"}).text
    assert "models: gpt-4o*, o3; providers: openai" in listing
    assert f'<time datetime="{shown["expiresAt"]}">' in listing and 'warn">expired<' not in listing

    rotate = f"/admin/keys/{key_id[1]}/rotate"
    assert 'name="graceSeconds"' in client.get(rotate).text
    for grace in ("1h", "604801", "-5", "1.5"):
        refused = client.post(rotate, data={"graceSeconds": grace, "csrf_token": token})
        assert refused.status_code == 400 and "&#39;graceSeconds&#39; must be a whole number" in refused.text, grace
    assert httpx.get(f"{gateway.url}/tokens/{key[1]}").status_code == 200  # refused rotations changed nothing
    rotated = client.post(rotate, data={"graceSeconds": "600", "csrf_token": token})
    assert rotated.status_code == 200 and "keeps working for 600 more seconds" in rotated.text
    new_key = re.search(r'value="(sk_[0-9a-f]{64})"', rotated.text)
    assert new_key is not None and new_key[1] != key[1]
    for secret in (key[1], new_key[1]):  # the old secret still works during its grace period
        assert httpx.get(f"{gateway.url}/tokens/{secret}").json()["keyId"] == key_id[1]
    events = httpx.get(f"{gateway.url}/audit", params={"keyId": key_id[1]}, headers=admin).json()["events"]
    assert [(e["action"], e["actor"]) for e in events] == [("key.rotated", "admin-api"), ("key.created", "admin-api")]
    assert events[0]["changes"]["previousSecretUntil"]["after"] is not None
    assert events[1]["changes"]["allowedProviders"] == {"before": None, "after": ["openai"]}

    team_page = client.get("/admin/teams/team_gov").text
    assert "Any model, any provider" in team_page
    patch = {"allowedModels": ["gpt-4o*"]}
    assert httpx.patch(f"{gateway.url}/teams/team_gov", json=patch, headers=admin).status_code == 200
    assert "<p data-team-allowed>models: gpt-4o*</p>" in client.get("/admin/teams/team_gov").text

    audit_page = client.get("/admin/audit", params={"teamId": "team_gov"})
    assert audit_page.status_code == 200
    rows = re.findall(
        r'<tr data-audit-id="aud_[0-9a-f]+">\s*<td>.*?</td>\s*<td>([a-z.]+)</td>\s*<td>([a-z-]+)</td>', audit_page.text
    )
    assert rows == [("team.updated", "admin-api"), ("key.rotated", "admin-api"), ("key.created", "admin-api")]
    for secret in (key[1], new_key[1], ADMIN_KEY):
        assert secret not in audit_page.text and secret[:20] not in audit_page.text

    limits = client.post("/admin/teams/team_gov", data={"form": "limits", "maxConcurrent": "3", "csrf_token": token})
    assert limits.status_code == 303, limits.text
    updates = httpx.get(f"{gateway.url}/audit", params={"teamId": "team_gov", "action": "team.updated"}, headers=admin)
    latest = updates.json()["events"][0]
    assert latest["actor"] == "admin-api" and latest["changes"]["limits"]["after"]["maxConcurrent"] == 3


def test_the_audit_page_filters_and_pages(gateway: GatewayProcess, client: httpx.Client) -> None:
    for n in range(51):
        gateway.create_key("team_audit_pages", f"Key {n}")
    first = client.get("/admin/audit", params={"teamId": "team_audit_pages", "action": "key.created"})
    assert first.status_code == 200 and first.text.count('data-audit-id="') == 50
    assert '"Key 50"' in first.text and '"Key 0"' not in first.text  # newest first
    older = re.search(r'href="/admin/audit\?([^"]+)">Older</a>', first.text)
    assert older is not None and "teamId=team_audit_pages" in older[1]
    second = client.get("/admin/audit?" + html.unescape(older[1]))
    assert second.status_code == 200 and second.text.count('data-audit-id="') == 1 and '"Key 0"' in second.text
    assert "Older</a>" not in second.text and "Newest</a>" in second.text
    assert (
        client.get("/admin/audit", params={"action": "key.revoked", "teamId": "team_audit_pages"}).text.count(
            'data-audit-id="'
        )
        == 0
    )
    assert client.get("/admin/audit", params={"to": "2000-01-01"}).text.count('data-audit-id="') == 0
    for query, message in [
        ({"action": "key.stolen"}, "&#39;action&#39; must be one of"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "&#39;from&#39; must not be after &#39;to&#39;."),
        ({"teamId": "a\x1bb"}, "control characters"),
        ({"keyId": "k" * 129}, "at most 128 characters"),
        ({"cursor": "nonsense!"}, "&#39;cursor&#39; is not a cursor"),
    ]:
        response = client.get("/admin/audit", params=query)
        assert response.status_code == 400 and message in response.text, (query, response.text)
        assert response.headers["content-type"].startswith("text/html") and "Traceback" not in response.text
    assert 'href="/admin/audit"' in client.get("/admin").text
