"""The admin console in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright),
against a gateway started from its Procfile and the fake upstream, with the real OpenAI SDK.

One walk through the console as an operator would take it, checked as it goes: sign in (a wrong
key first), issue a key and copy it, give its team a budget and allow-lists, call the gateway with
it, find the call in the overview and the usage explorer with the figures ``GET /usage`` gives and
the budget bar moved to the ``spentUsd`` of ``GET /teams/{teamId}``, set the key's allow-lists,
rotate and revoke, and a forged change refused. Every page is checked by axe-core at 1280 and
390 pixels wide (no serious or critical violation, nothing wider than the screen), every page's
console stays free of errors, and a screenshot of each is saved under ``test-artifacts/console/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

from service.mock_upstream import MockUpstream
from tests.support import (
    ADMIN_KEY,
    GATEWAY_TOKEN,
    ROOT,
    GatewayProcess,
    free_port,
    launch,
    procfile_command,
    wait_until,
    with_bin_on_path,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "console"
WIDTHS = {1280: 800, 390: 844}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TEAM = "team_browser"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs it; this is a real failure)")
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def console_gateway(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("console")
    port = free_port()
    env = with_bin_on_path(
        {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AI_GATEWAY", "ADMIN_", "CONSOLE_"))},
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "AI_GATEWAY_URL": upstream.url,
            "AI_GATEWAY_TOKEN": GATEWAY_TOKEN,
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": f"sqlite:///{tmp}/gateway.db",
            "PYTHONUNBUFFERED": "1",
        }
    )
    gateway = launch(["sh", "-c", procfile_command()], env, tmp, port, ready_path="/readyz")
    yield gateway
    gateway.stop()


class Session:
    """One browser context (a fresh profile) with every console error and page error collected."""

    def __init__(self, browser: Browser, base_url: str, width: int = 1280) -> None:
        self.context: BrowserContext = browser.new_context(
            base_url=base_url, viewport={"width": width, "height": WIDTHS[width]}, accept_downloads=True
        )
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"{message.type}: {message.text} ({self.page.url})")

    def sign_in(self, key: str = ADMIN_KEY) -> None:
        """By keyboard: the key field has the focus, Enter submits."""
        self.page.goto("/admin/login")
        assert self.page.evaluate("document.activeElement.id") == "admin_key"
        self.page.keyboard.type(key)
        with self.page.expect_navigation():
            self.page.keyboard.press("Enter")

    def expected_errors(self, status: int, count: int) -> None:
        """The browser reports a refused request as a console error: exactly ``count`` of ``status``,
        which are the point of the step, and nothing else."""
        refused = f"the server responded with a status of {status}"
        assert len(self.errors) == count and all(refused in error for error in self.errors), self.errors
        self.errors.clear()

    def close(self) -> None:
        self.context.close()


def figures(page: Page, scope: str) -> dict[str, str]:
    cells = page.locator(f"{scope} [data-figure]")
    return {cells.nth(i).get_attribute("data-figure") or "": cells.nth(i).inner_text() for i in range(cells.count())}


def shown(totals: dict[str, Any]) -> dict[str, str]:
    """``GET /usage`` totals as the console writes them."""
    cost = totals["costUsd"]
    return {
        "requests": f"{totals['requests']:,}",
        "inputTokens": f"{totals['inputTokens']:,}",
        "outputTokens": f"{totals['outputTokens']:,}",
        "costUsd": "—" if cost is None else f"${cost:.6f}",
    }


def usage(gateway: GatewayProcess, **query: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/usage", params=query, headers=ADMIN)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def team_state(gateway: GatewayProcess) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/teams/{TEAM}", headers=ADMIN)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def budget_bar(page: Page) -> tuple[float, float]:
    """The team's budget bar: its ``<meter>``'s maximum and value, in dollars."""
    meter = page.locator(f"meter[data-budget='{TEAM}']")
    return float(meter.get_attribute("max") or "nan"), float(meter.get_attribute("value") or "nan")


def check_page(session: Session, name: str, axe: Axe) -> None:
    """axe-core finds no serious or critical violation, nothing is wider than the screen, a screenshot."""
    page = session.page
    results = axe.run(page)
    serious = [
        f"{violation['id']} ({violation['impact']}): {[node['target'] for node in violation['nodes']][:3]}"
        for violation in results.response["violations"]
        if violation["impact"] in ("serious", "critical")
    ]
    assert not serious, f"{name}: {serious}"
    width = page.viewport_size["width"] if page.viewport_size else 0
    assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name} is wider than {width} px"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)


def test_the_console_end_to_end_in_chromium(chromium: Browser, console_gateway: GatewayProcess) -> None:
    gateway = console_gateway
    session = Session(chromium, gateway.url)
    page = session.page
    axe = Axe()

    # a wrong admin key is refused, and answered slowly; the right one signs in
    session.sign_in("not-the-admin-key")
    assert page.url.endswith("/admin/login")
    assert "That is not the admin key." in page.locator("[role=alert]").inner_text()
    session.expected_errors(401, 1)
    check_page(session, "login", axe)
    session.sign_in()
    assert page.url == gateway.url + "/admin"
    # the session is a signed HttpOnly cookie: nothing the page's scripts can read, no admin key kept
    cookies = session.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("gateway_console", True, "Strict")]
    assert ADMIN_KEY not in cookies[0]["value"]
    assert page.evaluate("document.cookie + localStorage.length + sessionStorage.length") == "00"

    # issue a key by keyboard, and copy it with the copy button
    page.goto("/admin/keys")
    for _ in range(40):
        if page.evaluate("document.activeElement.id") == "teamId":
            break
        page.keyboard.press("Tab")
    page.keyboard.type(TEAM)
    page.keyboard.press("Tab")
    page.keyboard.type("Browser team")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.locator("h1").inner_text() == "Key created"
    assert "Copy this key now" in page.locator(".warning").inner_text()
    key = page.locator("#new-key").input_value()
    assert re.fullmatch(r"sk_[0-9a-f]{64}", key)
    check_page(session, "key-created", axe)
    page.get_by_role("button", name="Copy").click()
    page.locator(".copy-status").filter(has_text="Copied.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == key
    key_id = page.locator("main p code").first.inner_text()

    # give the team a budget on its page, by its labelled form: the API reads what was saved, and
    # the teams page shows a bar at the API's spentUsd (nothing spent yet)
    page.goto(f"/admin/teams/{TEAM}")
    page.get_by_label("Requests per minute").fill("100")
    page.get_by_label("Budget (USD)").fill("5")
    page.get_by_label("Budget period").select_option("day")
    with page.expect_navigation():
        page.get_by_role("button", name="Save limits").click()
    assert "Limits saved" in page.locator("[role=status]").inner_text()
    check_page(session, "team-limits", axe)
    limits = team_state(gateway)["limits"]
    assert (limits["requestsPerMinute"], limits["budgetUsd"], limits["budgetPeriod"]) == (100, 5.0, "day")
    page.goto("/admin/teams")
    assert budget_bar(page) == (5.0, team_state(gateway)["state"]["spentUsd"] or 0.0) == (5.0, 0.0)

    # and allow-lists, typed into its other form (a click, then the keyboard): shown on its page, set
    # as GET /teams/{teamId} reads them, refused with the API's message when a provider is unknown
    page.goto(f"/admin/teams/{TEAM}")
    assert page.locator("[data-team-allowed]").inner_text() == "Any model, any provider"
    page.get_by_label("Allowed models").click()
    page.keyboard.type("gpt-4o*")
    page.keyboard.press("Tab")
    page.keyboard.type("openai, nowhere")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "unknown provider 'nowhere'" in page.locator("#allow-error").inner_text()
    assert page.get_by_label("Allowed providers").input_value() == "openai, nowhere"
    session.expected_errors(400, 1)
    page.get_by_label("Allowed providers").fill("openai")
    with page.expect_navigation():
        page.get_by_role("button", name="Save allow-lists").click()
    assert "Allow-lists saved" in page.locator("[role=status]").inner_text()
    assert page.locator("[data-team-allowed]").inner_text() == "models: gpt-4o*; providers: openai"
    assert page.get_by_label("Allowed models").input_value() == "gpt-4o*"
    check_page(session, "team-allow-lists", axe)
    allowed = team_state(gateway)
    assert (allowed["allowedModels"], allowed["allowedProviders"]) == (["gpt-4o*"], ["openai"])
    assert allowed["limits"]["budgetUsd"] == 5.0  # the other form's settings stay

    # the key works through the real OpenAI SDK, and the calls reach the ledger
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True)
    assert list(stream)
    today = datetime.now(UTC).date()
    day_range = {"from": today.isoformat(), "to": (today + timedelta(days=1)).isoformat()}
    wait_until(lambda: usage(gateway, **day_range)["totals"]["requests"] == 2, 10, "both calls in the ledger")

    # the budget bar moved: on the teams page and the overview, to the spentUsd GET /teams/{teamId} answers
    def settled() -> bool:
        state = team_state(gateway)["state"]
        return bool(state["inFlight"] == 0 and state["reservedUsd"] == 0)

    wait_until(settled, 10, "both calls settled")
    spent = team_state(gateway)["state"]["spentUsd"]
    assert spent > 0 and spent == usage(gateway, teamId=TEAM, **day_range)["totals"]["costUsd"]
    page.goto("/admin/teams")
    assert budget_bar(page) == (5.0, spent)
    assert page.locator(f"[data-limits='{TEAM}']").inner_text() == "100 requests/min, $5.00 a day"
    page.goto("/admin")
    assert budget_bar(page) == (5.0, spent)

    # the overview shows them, the figures equal to GET /usage's for today and this month
    page.goto("/admin")
    assert figures(page, ".card:nth-of-type(1)") == shown(usage(gateway, **day_range)["totals"])
    month = {"from": today.replace(day=1).isoformat(), "to": day_range["to"]}
    assert figures(page, ".card:nth-of-type(2)") == shown(usage(gateway, **month)["totals"])
    assert "openai" in page.locator("#chart-provider-desc").text_content()
    assert TEAM in page.locator("#chart-team-desc").text_content()
    check_page(session, "overview", axe)

    # the usage explorer, asked through its form: the same rows and totals as GET /usage
    page.goto("/admin/usage")
    page.get_by_label("Team id").fill(TEAM)
    page.get_by_label("model", exact=True).check()
    with page.expect_navigation():
        page.get_by_role("button", name="Show").click()
    expected = usage(gateway, teamId=TEAM, groupBy="day,model")
    assert figures(page, "tfoot") == shown(expected["totals"])
    assert page.locator("table.usage tbody tr").count() == len(expected["rows"]) >= 1
    check_page(session, "usage", axe)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    csv = httpx.get(
        f"{gateway.url}/usage", params={"teamId": TEAM, "groupBy": "day,model", "format": "csv"}, headers=ADMIN
    )
    assert Path(download.value.path()).read_bytes() == csv.content

    # teams, a team's page, status
    page.goto("/admin/teams")
    assert page.locator(f"[data-keys='{TEAM}']").inner_text() == "1"
    check_page(session, "teams", axe)
    with page.expect_navigation():
        page.get_by_role("link", name=TEAM).click()
    assert "gpt-4o" in page.locator("#chart-team-models-desc").text_content()
    check_page(session, "team", axe)
    page.goto("/admin/status")
    status_text = page.locator("main").inner_text()
    assert "openai" in status_text and "answering" in status_text
    assert ADMIN_KEY not in page.content() and GATEWAY_TOKEN not in page.content()
    check_page(session, "status", axe)

    # a forged change, from the console's own origin with the session cookie but without the
    # CSRF token (or with a made-up one), is refused and changes nothing
    for body in ({"teamId": "team_forged"}, {"teamId": "team_forged", "csrf_token": "0" * 64}):
        status = page.evaluate(
            "body => fetch('/admin/keys', {method: 'POST', body: new URLSearchParams(body)}).then(r => r.status)",
            body,
        )
        assert status == 403
    session.expected_errors(403, 2)
    assert httpx.get(f"{gateway.url}/tokens", params={"teamId": "team_forged"}, headers=ADMIN).json()["tokens"] == []

    # rotate: a confirmation, then the new secret shown once; the old one is refused, the new one works
    page.goto(f"/admin/keys?team={TEAM}")
    check_page(session, "keys", axe)
    with page.expect_navigation():
        page.get_by_role("link", name=f"Rotate {key_id}").click()
    check_page(session, "rotate", axe)
    with page.expect_navigation():
        page.get_by_role("button", name=f"Rotate {key_id}").click()
    assert page.locator("h1").inner_text() == "Key rotated"
    new_key = page.locator("#new-key").input_value()
    assert new_key != key and re.fullmatch(r"sk_[0-9a-f]{64}", new_key)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    rotated = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=new_key, max_retries=0)
    rotated.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.PermissionDeniedError):  # outside the team's allow-lists set above
        rotated.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "Hi"}])

    # the key's own allow-lists, on its page from the keys list
    page.goto(f"/admin/keys?team={TEAM}")
    with page.expect_navigation():
        page.get_by_role("link", name=f"Allow-lists of {key_id}").click()
    check_page(session, "key-allow-lists", axe)
    page.get_by_label("Allowed models").fill("gpt-4o-mini")
    with page.expect_navigation():
        page.get_by_role("button", name="Save allow-lists").click()
    assert f"Allow-lists of key {key_id} saved" in page.locator("[role=status]").inner_text()
    assert page.locator(f"tr[data-key-id='{key_id}']").inner_text().count("models: gpt-4o-mini") == 1
    assert httpx.get(f"{gateway.url}/keys/{key_id}", headers=ADMIN).json()["allowedModels"] == ["gpt-4o-mini"]

    # revoke: a confirmation, then the key is gone and refused
    page.goto(f"/admin/keys?team={TEAM}")
    with page.expect_navigation():
        page.get_by_role("link", name=f"Revoke {key_id}").click()
    check_page(session, "revoke", axe)
    with page.expect_navigation():
        page.get_by_role("button", name=f"Revoke {key_id}").click()
    assert f"Key {key_id} revoked" in page.locator("[role=status]").inner_text()
    with pytest.raises(openai.AuthenticationError):
        rotated.models.list()
    assert httpx.get(f"{gateway.url}/keys/{key_id}", headers=ADMIN).status_code == 404

    # the audit trail: the console's changes, by admin-api, and no secret on the page
    page.goto(f"/admin/audit?keyId={key_id}")
    actions = page.locator("table.audit tbody tr td:nth-child(2)").all_inner_texts()
    assert actions == ["key.revoked", "key.updated", "key.rotated", "key.created"]
    assert set(page.locator("table.audit tbody tr td:nth-child(3)").all_inner_texts()) == {"admin-api"}
    assert key not in page.content() and new_key not in page.content() and ADMIN_KEY not in page.content()
    check_page(session, "audit", axe)

    # signing out ends the session: the pages send you back to sign in
    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    assert page.url.endswith("/admin/login")
    page.goto("/admin/keys")
    assert page.url.endswith("/admin/login")
    assert session.errors == []
    session.close()


PAGES = {
    "overview": "/admin",
    "keys": "/admin/keys",
    "teams": "/admin/teams",
    "team": f"/admin/teams/{TEAM}_narrow",
    "usage": "/admin/usage?groupBy=day&groupBy=provider",
    "status": "/admin/status",
    "audit": "/admin/audit",
}


def test_every_page_at_390_px(chromium: Browser, console_gateway: GatewayProcess) -> None:
    session = Session(chromium, console_gateway.url, width=390)
    page = session.page
    axe = Axe()
    page.goto("/admin/login")
    check_page(session, "login", axe)
    session.sign_in()
    page.goto("/admin/keys")
    page.get_by_label("Team id").fill(f"{TEAM}_narrow")
    with page.expect_navigation():
        page.get_by_role("button", name="Issue key").click()
    check_page(session, "key-created", axe)
    key_id = page.locator("main p code").first.inner_text()
    limits = {"limits": {"tokensPerMinute": 20_000, "budgetUsd": 2.5}}  # a budget bar on the narrow pages
    assert httpx.patch(f"{console_gateway.url}/teams/{TEAM}_narrow", json=limits, headers=ADMIN).status_code == 200
    for name, path in PAGES.items():
        page.goto(path)
        check_page(session, name, axe)
    for name, action in {"key-allow-lists": "allow-lists", "rotate": "rotate", "revoke": "revoke"}.items():
        page.goto(f"/admin/keys/{key_id}/{action}")
        check_page(session, name, axe)
    assert session.errors == []
    session.close()
