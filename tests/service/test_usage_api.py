"""The usage API against a real gateway, the `gateway usage` command through its entry point, and
the retention setting. Ledger rows are written through the store, on the gateway's own database."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from config import Settings, SettingsError
from service.core.ledger import LedgerRow
from service.core.store import SQLiteStore
from service.mock_upstream import MockUpstream
from tests.support import ADMIN_KEY, BIN, GatewayProcess, gateway_env, start_gateway

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TODAY = datetime.now(UTC).date()


def row(n: int, at: str, **fields: object) -> LedgerRow:
    base = LedgerRow(
        request_id=f"gw_req_{n:06d}",
        client_request_id=None,
        at=at,
        team_id="team_a",
        key_id="key_aaaaaaaaaaaaaaaa",
        provider="openai",
        model="gpt-4o",
        status=200,
        input_tokens=1_000,
        output_tokens=300,
        cache_read_tokens=400,
        cache_write_tokens=None,
        reasoning_tokens=None,
        cost_micro_usd=5_000,
        duration_ms=812.25,
        ttfb_ms=120.5,
        complete=True,
    )
    return base._replace(**fields)


ROWS = [
    row(1, "2026-11-01T09:00:00.000Z"),
    row(2, "2026-11-01T09:30:00.000Z", cost_micro_usd=1_234, client_request_id="client-2"),
    row(3, "2026-11-01T17:45:10.250Z", model="mystery-model", cost_micro_usd=None, input_tokens=None),
    row(4, "2026-11-02T08:00:00.000Z", team_id="team_b", key_id="key_bbbbbbbbbbbbbbbb", provider="anthropic"),
    row(5, "2026-11-02T23:59:59.999Z", team_id="=HYPERLINK(1)", key_id="key_cccccccccccccccc", model="claude"),
    row(6, "2026-11-03T00:00:00.000Z", cost_micro_usd=999_999_999_999),
    row(7, f"{TODAY.isoformat()}T00:00:00.000Z", cost_micro_usd=7, reasoning_tokens=11, status=502, complete=False),
]


def record(database: Path, rows: Sequence[LedgerRow]) -> None:
    """Write ledger rows as the gateway's ledger does: through the store, on the same database."""

    async def write() -> None:
        store = SQLiteStore(database)
        await store.open()
        try:
            await store.record_usage(rows)
        finally:
            await store.close()

    asyncio.run(write())


@pytest.fixture(scope="module")
def served(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("usage")
    gateway = start_gateway(gateway_env(upstream.url, tmp), tmp)
    record(tmp / "gateway.db", ROWS)
    yield gateway
    gateway.stop()


def get(gateway: GatewayProcess, path: str, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
    return httpx.get(gateway.url + path, params=params, headers=ADMIN if headers is None else headers)


def test_usage_needs_the_admin_bearer(served: GatewayProcess, make_gateway: Callable[..., GatewayProcess]) -> None:
    for path in ("/usage", "/usage/requests/gw_req_000001"):
        assert get(served, path, {}).status_code == 401
        wrong = get(served, path, {"authorization": "Bearer not-the-admin-key"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "Invalid admin key."
    disabled = make_gateway(ADMIN_API_KEY="")
    refused = get(disabled, "/usage")
    assert refused.status_code == 403 and "ADMIN_API_KEY" in refused.json()["error"]


def test_usage_by_day_and_model_with_exact_costs(served: GatewayProcess) -> None:
    response = get(served, "/usage", **{"from": "2026-11-01", "to": "2026-11-03", "groupBy": "day,model"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["from"], body["to"], body["groupBy"]) == (
        "2026-11-01T00:00:00.000Z",
        "2026-11-03T00:00:00.000Z",
        ["day", "model"],
    )
    assert [(r["day"], r["model"], r["requests"], r["costUsd"]) for r in body["rows"]] == [
        ("2026-11-01", "gpt-4o", 2, 0.006234),
        ("2026-11-01", "mystery-model", 1, None),
        ("2026-11-02", "claude", 1, 0.005),
        ("2026-11-02", "gpt-4o", 1, 0.005),
    ]
    unpriced = body["rows"][1]
    assert unpriced == {
        "day": "2026-11-01",
        "model": "mystery-model",
        "requests": 1,
        "inputTokens": 0,
        "outputTokens": 300,
        "cacheReadTokens": 400,
        "cacheWriteTokens": 0,
        "reasoningTokens": 0,
        "costUsd": None,
        "unpricedRequests": 1,
    }
    assert body["totals"] == {
        "requests": 5,
        "inputTokens": 4_000,
        "outputTokens": 1_500,
        "cacheReadTokens": 2_000,
        "cacheWriteTokens": 0,
        "reasoningTokens": 0,
        "costUsd": 0.016234,
        "unpricedRequests": 1,
    }
    assert b'"costUsd":0.006234' in response.content  # written from the integer, six decimals
    # a cost beyond what a float holds to the micro-dollar is still exact in the body
    big = get(served, "/usage", **{"from": "2026-11-03", "to": "2026-11-04", "groupBy": "day"})
    assert b'"costUsd":999999.999999' in big.content


def test_usage_by_time_team_key_and_provider_with_filters(served: GatewayProcess) -> None:
    times = {"from": "2026-11-01T09:15:00Z", "to": "2026-11-02T10:00:00%2B01:00"}  # = 09:00Z
    query = f"/usage?from={times['from']}&to={times['to']}&groupBy=hour,team,key,provider"
    body = httpx.get(served.url + query, headers=ADMIN).json()
    assert (body["from"], body["to"]) == ("2026-11-01T09:15:00.000Z", "2026-11-02T09:00:00.000Z")
    assert [(r["hour"], r["teamId"], r["keyId"], r["provider"], r["requests"]) for r in body["rows"]] == [
        ("2026-11-01T09:00:00Z", "team_a", "key_aaaaaaaaaaaaaaaa", "openai", 1),
        ("2026-11-01T17:00:00Z", "team_a", "key_aaaaaaaaaaaaaaaa", "openai", 1),
        ("2026-11-02T08:00:00Z", "team_b", "key_bbbbbbbbbbbbbbbb", "anthropic", 1),
    ]
    window = {"from": "2026-11-01", "to": "2026-11-04"}
    for filters, requests in (
        ({"teamId": "team_b"}, 1),
        ({"keyId": "key_aaaaaaaaaaaaaaaa"}, 4),
        ({"provider": "openai"}, 5),
        ({"model": "gpt-4o", "teamId": "team_a"}, 3),
        ({"teamId": "nobody"}, 0),
    ):
        filtered = get(served, "/usage", **window, **filters).json()
        assert filtered["totals"]["requests"] == requests, filters
    empty = get(served, "/usage", **window, teamId="nobody").json()
    assert empty["rows"] == [] and empty["totals"]["costUsd"] is None


def test_the_default_range_is_the_last_30_days(served: GatewayProcess) -> None:
    body = get(served, "/usage").json()
    end = TODAY + timedelta(days=1)
    assert (body["from"], body["to"]) == (f"{end - timedelta(days=30)}T00:00:00.000Z", f"{end}T00:00:00.000Z")
    assert body["groupBy"] == ["day"]
    today = [r for r in body["rows"] if r["day"] == TODAY.isoformat()]
    assert today and today[0]["reasoningTokens"] >= 11


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"from": "yesterday"}, "'from' must be a date like 2026-11-01 or a UTC time like 2026-11-01T12:00:00Z."),
        ({"to": "2026-13-01"}, "'to' must be a date"),
        ({"from": "2026-11-01T12:00:00"}, "'from' must be a date"),  # a time needs its zone
        ({"from": "2026-11-01T12:00:00.1234Z"}, "'from' must be a date"),
        ({"from": "\uff12\uff10\uff12\uff16-11-01"}, "'from' must be a date"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "'from' must not be after 'to'."),
        ({"from": "2025-01-01", "to": "2026-02-06"}, "The range from 'from' to 'to' must be at most 400 days."),
        ({"to": "0001-01-05"}, "'to' is too early for a range of 30 days before it; give 'from' too."),
        ({"groupBy": "day,week"}, "'groupBy' cannot be 'week': use hour, day, team, key, provider, model."),
        ({"groupBy": ""}, "'groupBy' must list one or more of"),
        ({"groupBy": "day,,model"}, "'groupBy' must list one or more of"),
        ({"format": "xml"}, "'format' must be json or csv."),
        ({"teamId": "a\x1bb"}, "'teamId' must not contain control characters."),
        ({"keyId": " "}, "'keyId' must not be empty."),
        ({"model": "m" * 257}, "'model' must be at most 256 characters."),
    ],
)
def test_usage_parameters_are_checked(served: GatewayProcess, query: dict[str, str], message: str) -> None:
    response = get(served, "/usage", **query)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(message) and response.json()["requestId"]


def test_a_range_of_exactly_400_days_and_an_empty_one_are_fine(served: GatewayProcess) -> None:
    assert get(served, "/usage", **{"from": "2025-10-08", "to": "2026-11-12"}).status_code == 200
    same = get(served, "/usage", **{"from": "2026-11-01", "to": "2026-11-01"})
    assert same.status_code == 200 and same.json()["rows"] == []


def test_usage_as_csv(served: GatewayProcess) -> None:
    query = {"from": "2026-11-01", "to": "2026-11-04", "groupBy": "day,team", "format": "csv"}
    response = get(served, "/usage", **query)
    assert response.status_code == 200 and response.headers["content-type"] == "text/csv; charset=utf-8"
    lines = list(csv.reader(io.StringIO(response.text)))
    assert lines[0] == [
        "day",
        "teamId",
        "requests",
        "inputTokens",
        "outputTokens",
        "cacheReadTokens",
        "cacheWriteTokens",
        "reasoningTokens",
        "costUsd",
        "unpricedRequests",
    ]
    assert lines[1:] == [
        ["2026-11-01", "team_a", "3", "2000", "900", "1200", "0", "0", "0.006234", "1"],
        ["2026-11-02", "'=HYPERLINK(1)", "1", "1000", "300", "400", "0", "0", "0.005000", "0"],  # never a formula
        ["2026-11-02", "team_b", "1", "1000", "300", "400", "0", "0", "0.005000", "0"],
        ["2026-11-03", "team_a", "1", "1000", "300", "400", "0", "0", "999999.999999", "0"],
    ]
    unpriced = get(served, "/usage", **{**query, "groupBy": "model", "model": "mystery-model"})
    assert unpriced.text.splitlines()[1] == "mystery-model,1,0,300,400,0,0,,1"


def test_one_request_by_its_id(served: GatewayProcess) -> None:
    response = get(served, "/usage/requests/gw_req_000002")
    assert response.status_code == 200
    assert response.json() == {
        "requestId": "gw_req_000002",
        "clientRequestId": "client-2",
        "at": "2026-11-01T09:30:00.000Z",
        "teamId": "team_a",
        "keyId": "key_aaaaaaaaaaaaaaaa",
        "provider": "openai",
        "model": "gpt-4o",
        "status": 200,
        "inputTokens": 1000,
        "outputTokens": 300,
        "cacheReadTokens": 400,
        "cacheWriteTokens": None,
        "reasoningTokens": None,
        "costUsd": 0.001234,
        "durationMs": 812.25,
        "ttfbMs": 120.5,
        "complete": True,
    }
    unpriced = get(served, "/usage/requests/gw_req_000003").json()
    assert unpriced["costUsd"] is None and unpriced["inputTokens"] is None
    cut = get(served, "/usage/requests/gw_req_000007").json()
    assert (cut["status"], cut["complete"], cut["costUsd"]) == (502, False, 0.000007)
    for unknown in ("gw_req_999999", "x" * 300):
        missing = get(served, f"/usage/requests/{unknown}")
        assert missing.status_code == 404 and missing.json()["error"] == "Request not found"


def test_a_key_sees_its_own_usage(served: GatewayProcess, tmp_path: Path) -> None:
    key = served.create_key("team_usage", "Usage Team")
    key_id = httpx.get(f"{served.url}/tokens/{key}").json()["keyId"]
    database = Path(served.env["DATABASE_URL"].removeprefix("sqlite:///"))
    own = dict(team_id="team_usage", key_id=key_id)
    record(
        database,
        [
            row(101, "2026-11-01T10:00:00.000Z", **own),
            row(102, "2026-11-01T11:00:00.000Z", **own, model="gpt-4o-mini", cost_micro_usd=150),
            row(103, "2026-11-02T10:00:00.000Z", **own),
        ],
    )
    query = {"from": "2026-11-01", "to": "2026-11-04"}
    response = httpx.get(f"{served.url}/tokens/{key}/usage", params=query)  # no admin bearer: the key suffices
    assert response.status_code == 200
    body = response.json()
    assert body["groupBy"] == ["day", "model"]
    assert [(r["day"], r["model"], r["requests"], r["costUsd"]) for r in body["rows"]] == [
        ("2026-11-01", "gpt-4o", 1, 0.005),
        ("2026-11-01", "gpt-4o-mini", 1, 0.00015),
        ("2026-11-02", "gpt-4o", 1, 0.005),
    ]
    assert body["totals"]["requests"] == 3  # none of the other keys' rows

    rotated = httpx.post(f"{served.url}/tokens/{key}/refresh").json()["apiKey"]  # the same key id
    assert httpx.get(f"{served.url}/tokens/{rotated}/usage", params=query).json()["rows"] == body["rows"]
    for wrong in (key, "sk_" + "0" * 64, "not-a-key"):
        missing = httpx.get(f"{served.url}/tokens/{wrong}/usage", params=query)
        assert missing.status_code == 404 and missing.json()["error"] == "Token not found"
    bad = httpx.get(f"{served.url}/tokens/{rotated}/usage", params={"from": "2026-11-05", "to": "2026-11-01"})
    assert bad.status_code == 400 and bad.json()["error"] == "'from' must not be after 'to'."
    assert httpx.get(f"{served.url}/tokens/{rotated}").status_code == 200  # its neighbour still answers
    as_csv = httpx.get(f"{served.url}/tokens/{rotated}/usage", params={**query, "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv") and as_csv.text.startswith("day,model,requests")
    assert len(as_csv.text.splitlines()) == 4


def test_a_parameter_given_twice_is_refused(served: GatewayProcess) -> None:
    for query in ("groupBy=day&groupBy=model", "teamId=a&teamId=b", "from=2026-11-01&from=2026-11-02"):
        response = httpx.get(f"{served.url}/usage?{query}", headers=ADMIN)
        assert response.status_code == 400 and "more than once" in response.json()["error"], query
    assert httpx.get(f"{served.url}/usage?groupBy=day,model", headers=ADMIN).status_code == 200


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gateway"), *args], env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_the_usage_command_on_the_database_directly(tmp_path: Path) -> None:
    env = gateway_env(None, tmp_path)
    record(tmp_path / "gateway.db", ROWS)
    window = ["--since", "2026-11-01", "--until", "2026-11-04"]

    shown = cli(env, "usage", *window, "--by", "day,model")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "usage from 2026-11-01T00:00:00.000Z to 2026-11-04T00:00:00.000Z (excluded)"
    assert lines[1].split() == [
        "day",
        "model",
        "requests",
        "inputTokens",
        "outputTokens",
        "cacheReadTokens",
        "cacheWriteTokens",
        "reasoningTokens",
        "cost",
        "unpricedRequests",
    ]
    assert lines[2].split() == ["2026-11-01", "gpt-4o", "2", "2000", "600", "800", "0", "0", "$0.006234", "0"]
    assert lines[3].split() == ["2026-11-01", "mystery-model", "1", "0", "300", "400", "0", "0", "unpriced", "1"]
    assert lines[-1].split() == ["total", "6", "5000", "1800", "2400", "0", "0", "$1000000.016233", "1"]

    as_json = orjson.loads(cli(env, "usage", *window, "--team", "team_a", "--by", "provider", "--json").stdout)
    assert as_json["groupBy"] == ["provider"] and as_json["totals"]["requests"] == 4
    assert as_json["rows"] == [
        {
            "provider": "openai",
            "requests": 4,
            "inputTokens": 3000,
            "outputTokens": 1200,
            "cacheReadTokens": 1600,
            "cacheWriteTokens": 0,
            "reasoningTokens": 0,
            "costUsd": 1000000.006233,
            "unpricedRequests": 1,
        }
    ]
    as_csv = cli(env, "usage", *window, "--key", "key_bbbbbbbbbbbbbbbb", "--provider", "anthropic", "--csv")
    assert as_csv.stdout.splitlines()[1:] == ["2026-11-02,1,1000,300,400,0,0,0.005000,0"]
    model = orjson.loads(cli(env, "usage", *window, "--model", "claude", "--by", "team", "--json").stdout)
    assert [r["teamId"] for r in model["rows"]] == ["=HYPERLINK(1)"]  # exact in JSON

    recent = orjson.loads(cli(env, "usage", "--since", "2d", "--json").stdout)
    assert [r["day"] for r in recent["rows"]] == [TODAY.isoformat()]
    assert orjson.loads(cli(env, "usage", "--since", "24h", "--by", "hour", "--json").stdout)["groupBy"] == ["hour"]

    for args, message in (
        (["--since", "7w"], "gateway: --since must be like 7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z"),
        (["--by", "week"], "gateway: '--by' cannot be 'week': use hour, day, team, key, provider, model."),
        (["--since", "2026-11-05", "--until", "2026-11-01"], "gateway: '--since' must not be after '--until'."),
        (["--since", "500d"], "gateway: The range from '--since' to '--until' must be at most 400 days."),
        (["--team", "a\x1bb"], "gateway: '--team' must not contain control characters."),
    ):
        failed = cli(env, "usage", *args)
        assert (failed.returncode, failed.stderr.strip(), failed.stdout) == (2, message, ""), args
    both = cli(env, "usage", "--json", "--csv")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_usage_retention_days_setting() -> None:
    assert Settings.from_env({}, env_file=None).usage_retention_days == 90
    for raw, days in (("1", 1), ("3650", 3650), (" 30 ", 30)):
        assert Settings.from_env({"USAGE_RETENTION_DAYS": raw}, env_file=None).usage_retention_days == days
    for raw in ("0", "3651", "-5", "1e3", "\u0663", "9" * 5000, "30d"):
        with pytest.raises(SettingsError, match="USAGE_RETENTION_DAYS must be a whole number of days from 1 to 3650"):
            Settings.from_env({"USAGE_RETENTION_DAYS": raw}, env_file=None)


def test_the_usage_table_of_an_empty_range_shows_no_cost_rather_than_unpriced() -> None:
    from service.cli import usage_table
    from service.usage import totals

    empty = {"groupBy": ["day"], "rows": [], "totals": totals([])}
    total_line = usage_table(empty).splitlines()[-1].split()
    assert total_line[0] == "total" and "-" in total_line and "unpriced" not in total_line
