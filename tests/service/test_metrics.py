"""/metrics scraped from a running gateway with two workers, and the Server-Timing header."""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY, GatewayProcess, free_port

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_add_up_across_two_workers(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(workers=2)
    key = gw.create_key("team_metrics")
    for _ in range(20):  # a new connection each: both workers serve some
        assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": "Bearer sk_" + "0" * 64})
    httpx.get(f"{gw.url}/openai/_mock/status/503", headers={"authorization": f"Bearer {key}"})
    time.sleep(1.5)  # each worker publishes its tallies once a second
    response = httpx.get(f"{gw.url}/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "gateway_requests_total", provider="openai", status_class="2xx", team="team_metrics") == 20
    assert sample(text, "gateway_requests_total", provider="openai", status_class="5xx", team="team_metrics") == 1
    assert sample(text, "gateway_requests_total", provider="openai", status_class="4xx", team="") == 1
    assert sample(text, "gateway_request_duration_seconds_count", provider="openai") == 22
    assert sample(text, "gateway_time_to_first_byte_seconds_count", provider="openai") == 22
    assert sample(text, "gateway_overhead_seconds_count", provider="openai") == 21  # not the refused one
    assert sample(text, "gateway_overhead_seconds_bucket", provider="openai", le="+Inf") == 21
    assert (
        sample(text, "gateway_auth_cache_total", result="hit") + sample(text, "gateway_auth_cache_total", result="miss")
        == 22
    )
    pids = {line for line in gw.log_text().splitlines() if "Started server process" in line}
    assert len(pids) == 2


def test_upstream_errors_and_streams_in_flight(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    key = gw.create_key()
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"})
    time.sleep(1.2)
    assert (
        sample(httpx.get(f"{gw.url}/metrics", headers=AUTH).text, "gateway_upstream_errors_total", kind="unavailable")
        == 1
    )


def test_streams_in_flight_gauge(gateway: GatewayProcess, team_key: str) -> None:
    seen: list[float] = []

    def scrape_during() -> None:
        time.sleep(0.5)
        seen.append(sample(httpx.get(f"{gateway.url}/metrics", headers=AUTH).text, "gateway_streams_in_flight"))

    scraper = threading.Thread(target=scrape_during)
    scraper.start()
    with httpx.stream(
        "GET", f"{gateway.url}/openai/_mock/sse?n=10&interval=0.1", headers={"authorization": f"Bearer {team_key}"}
    ) as response:
        for _ in response.iter_lines():
            pass
    scraper.join()
    assert seen == [1.0]
    assert sample(httpx.get(f"{gateway.url}/metrics", headers=AUTH).text, "gateway_streams_in_flight") == 0


def test_metrics_on_their_own_port(make_gateway: Callable[..., GatewayProcess]) -> None:
    port = free_port()
    gw = make_gateway(METRICS_PORT=str(port), workers=2)
    key = gw.create_key()
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"})
    time.sleep(1.2)
    assert httpx.get(f"{gw.url}/metrics", headers=AUTH).status_code == 404  # not on the public port
    private = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert private.status_code == 200
    assert sample(private.text, "gateway_requests_total", provider="openai", status_class="2xx") == 1


def test_server_timing_shows_the_gateway_and_the_upstream(gateway: GatewayProcess, team_key: str) -> None:
    response = httpx.get(
        f"{gateway.url}/openai/_mock/slow-headers?seconds=0.2", headers={"authorization": f"Bearer {team_key}"}
    )
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"]))
    assert float(timing["upstream"]) >= 200
    assert 0 < float(timing["gateway"]) < 50


def test_public_metrics_need_a_bearer(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway()
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    assert httpx.get(f"{gw.url}/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
    response = httpx.get(f"{gw.url}/metrics", headers=AUTH)
    assert response.status_code == 200 and "gateway_requests_total" in response.text
    gw.stop()
    own = make_gateway(METRICS_TOKEN="scrape-token-123")
    assert httpx.get(f"{own.url}/metrics", headers=AUTH).status_code == 401  # the token, once set, is the one
    assert httpx.get(f"{own.url}/metrics", headers={"authorization": "Bearer scrape-token-123"}).status_code == 200
    assert "scrape-token-123" not in own.log_text()
    own.stop()
    bare = make_gateway(ADMIN_API_KEY="")
    response = httpx.get(f"{bare.url}/metrics")
    assert response.status_code == 403 and "METRICS_TOKEN" in response.json()["error"]


def test_metrics_directories_are_removed_on_exit_and_when_stale(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    stale = Path(tempfile.gettempdir()) / "gateway-metrics-999999999-12345"
    stale.mkdir(exist_ok=True)
    (stale / "counter_999999999.db").write_bytes(b"")
    for workers in (1, 2):
        gw = make_gateway(workers=workers)
        assert not stale.exists()  # a dead gateway's directory goes at the next start
        owner = gw.process.pid
        mine = list(Path(tempfile.gettempdir()).glob(f"gateway-metrics-{owner}-*"))
        assert len(mine) == 1
        gw.stop()
        assert not mine[0].exists()
        stale.mkdir()
