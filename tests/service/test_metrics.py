"""/metrics scraped from a running gateway with two workers, and the Server-Timing header; the
collector itself in-process, with two ``Metrics`` on one directory standing in for two workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import service.core.metrics as metrics_module
from service.core.metrics import BUCKETS, OVERHEAD_BUCKETS, Metrics, remove_if_last
from tests.support import ADMIN_KEY, GatewayProcess, free_port, wait_until

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


def scrape(gw: GatewayProcess) -> str:
    response = httpx.get(f"{gw.url}/metrics", headers=AUTH)
    assert response.status_code == 200
    return response.text


def test_metrics_add_up_across_two_workers(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(workers=2)
    key = gw.create_key("team_metrics")
    for _ in range(20):  # a new connection each: both workers serve some
        assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": "Bearer sk_" + "0" * 64})
    httpx.get(f"{gw.url}/openai/_mock/status/503", headers={"authorization": f"Bearer {key}"})
    # each worker publishes its tallies once a second: poll until the other worker's are in
    wait_until(
        lambda: sample(scrape(gw), "gateway_request_duration_seconds_count", provider="openai") == 22,
        what="both workers' requests in the scrape",
    )
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
    wait_until(
        lambda: sample(scrape(gw), "gateway_upstream_errors_total", kind="unavailable") == 1,
        what="the upstream error in the scrape",
    )


def test_streams_in_flight_gauge(gateway: GatewayProcess, team_key: str) -> None:
    seen: list[float] = []
    with httpx.stream(
        "GET", f"{gateway.url}/openai/_mock/sse?n=10&interval=0.1", headers={"authorization": f"Bearer {team_key}"}
    ) as response:
        for line in response.iter_lines():
            if line and not seen:  # the stream has begun: it counts until its end
                seen.append(sample(scrape(gateway), "gateway_streams_in_flight"))
    assert seen == [1.0]
    wait_until(lambda: sample(scrape(gateway), "gateway_streams_in_flight") == 0, what="the stream leaving the gauge")


def test_metrics_on_their_own_port(make_gateway: Callable[..., GatewayProcess]) -> None:
    port = free_port()
    gw = make_gateway(METRICS_PORT=str(port), workers=2)
    key = gw.create_key()
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"})
    assert httpx.get(f"{gw.url}/metrics", headers=AUTH).status_code == 404  # not on the public port

    def counted() -> bool:
        private = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert private.status_code == 200
        return sample(private.text, "gateway_requests_total", provider="openai", status_class="2xx") == 1

    wait_until(counted, what="the request in the private port's scrape")


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


def test_an_operators_directory_is_kept(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    directory = tmp_path / "operator-metrics"
    gw = make_gateway(workers=2, PROMETHEUS_MULTIPROC_DIR=str(directory))
    key = gw.create_key()
    httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"})
    wait_until(lambda: len(list(directory.glob("worker-*.json"))) == 2, what="both workers' files")
    gw.stop()
    assert len(list(directory.glob("worker-*.json"))) == 2  # the operator's to keep (and to wipe)
    assert not list(Path(tempfile.gettempdir()).glob(f"gateway-metrics-{gw.process.pid}-*"))


# -- the collector in-process: two Metrics on one directory stand in for two workers -------------


def families(metrics: Metrics) -> dict[str, Any]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return sample(metrics.exposition()[0].decode(), name, **labels)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_two_workers_add_up(tmp_path: Path) -> None:
    one, other = Metrics(tmp_path), Metrics(tmp_path, pid=os.getppid())
    await one.start()
    await other.start()
    one.request("openai", 200, "team_a", 0.0003, 0.0002, 0.00004)
    one.request("openai", 503, "team_a", 0.2, None, None)
    other.request("openai", 200, "team_a", 0.2, 0.1, 0.003)
    other.request("anthropic", 404, "", 200.0, 0.01, 0.2)
    one.upstream_error("openai", "timeout")
    other.upstream_error("openai", "timeout")
    one.cache_hits += 2
    other.cache_misses += 1
    other.publish()  # what its task does once a second; one's own tallies are taken at the scrape

    for scraped in (one, other):  # whichever worker answers
        assert value(scraped, "gateway_requests_total", provider="openai", status_class="2xx", team="team_a") == 2
        assert value(scraped, "gateway_requests_total", provider="openai", status_class="5xx") == 1
        assert value(scraped, "gateway_requests_total", provider="anthropic", status_class="4xx", team="") == 1
        assert value(scraped, "gateway_upstream_errors_total", provider="openai", kind="timeout") == 2
        assert value(scraped, "gateway_auth_cache_total", result="hit") == 2
        assert value(scraped, "gateway_auth_cache_total", result="miss") == 1
        duration = "gateway_request_duration_seconds"
        assert value(scraped, duration + "_bucket", provider="openai", le="0.0005") == 1
        assert value(scraped, duration + "_bucket", provider="openai", le="0.1") == 1
        assert value(scraped, duration + "_bucket", provider="openai", le="0.25") == 3
        assert value(scraped, duration + "_bucket", provider="openai", le="+Inf") == 3
        assert value(scraped, duration + "_count", provider="openai") == 3
        assert value(scraped, duration + "_sum", provider="openai") == pytest.approx(0.4003)
        assert value(scraped, duration + "_bucket", provider="anthropic", le="120.0") == 0  # over every bound
        assert value(scraped, duration + "_bucket", provider="anthropic", le="+Inf") == 1
        assert value(scraped, "gateway_time_to_first_byte_seconds_count", provider="openai") == 2
        assert value(scraped, "gateway_overhead_seconds_bucket", provider="openai", le="5e-05") == 1
        assert value(scraped, "gateway_overhead_seconds_bucket", provider="openai", le="0.005") == 2
        assert value(scraped, "gateway_overhead_seconds_count", provider="openai") == 2
    parsed = families(one)
    assert parsed["gateway_request_duration_seconds"].type == "histogram"
    assert parsed["gateway_requests"].type == "counter"
    assert parsed["gateway_streams_in_flight"].type == "gauge"
    await one.stop()
    await other.stop()
    assert tmp_path.exists()  # given, not created by the gateway: kept


async def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    one, other, gone = Metrics(tmp_path), Metrics(tmp_path, pid=os.getppid()), Metrics(tmp_path, pid=dead_pid())
    for metrics in (one, other, gone):
        await metrics.start()
        metrics.request("openai", 200, "team_a", 0.01, 0.01, 0.001)
        metrics.streams.inc()
    other.degraded_probe = lambda: True
    other.publish()
    gone.degraded_probe = lambda: True
    gone.publish()  # then killed: it never stops cleanly
    assert value(one, "gateway_requests_total", provider="openai") == 3
    assert value(one, "gateway_request_duration_seconds_count", provider="openai") == 3
    assert value(one, "gateway_streams_in_flight") == 2  # one's and other's: gone's pid is not running
    assert b"gateway_store_degraded 1.0" in one.exposition()[0]  # other is degraded
    await other.stop()  # a clean stop: its counters stay, its gauges go at once
    assert value(one, "gateway_requests_total", provider="openai") == 3
    assert value(one, "gateway_streams_in_flight") == 1
    assert b"gateway_store_degraded 0.0" in one.exposition()[0]
    one.streams.dec()
    assert value(one, "gateway_streams_in_flight") == 0
    await one.stop()
    await gone.stop()


def test_constructing_metrics_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    def forbidden(*args: object) -> None:
        raise AssertionError("construction must not look for or create the directory")

    monkeypatch.setattr(metrics_module, "_started", forbidden)
    monkeypatch.setattr(metrics_module, "shared_directory", forbidden)
    monkeypatch.setattr(Path, "mkdir", forbidden)
    before = dict(os.environ)
    metrics = Metrics()
    metrics.request("openai", 200, "team_a", 0.01, None, None)
    assert dict(os.environ) == before
    assert metrics.directory is None
    assert value(metrics, "gateway_requests_total", provider="openai") == 1  # before start(): its own figures


async def test_the_directory_is_decided_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "configured"))
    metrics = Metrics()
    assert not (tmp_path / "configured").exists()
    await metrics.start()
    assert metrics.directory == tmp_path / "configured"
    assert [file.name for file in metrics.directory.glob("worker-*.json")] == [metrics.file_name]
    await metrics.stop()
    assert (tmp_path / "configured" / metrics.file_name).exists()  # an operator's directory is never removed
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    owned = Metrics()
    await owned.start()
    assert owned.directory is not None and owned.directory.name.startswith(f"gateway-metrics-{os.getpid()}-")
    await owned.stop()
    assert not owned.directory.exists()  # the last (only) worker out removes it


async def test_the_last_worker_out_removes_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "gateway-metrics-1-2"
    one, other = Metrics(directory), Metrics(directory, pid=os.getppid())
    await one.start()
    await other.start()
    await one.stop()
    remove_if_last(directory)  # other is running and has not stopped
    assert directory.exists()
    await other.stop()
    remove_if_last(directory)
    assert not directory.exists()


def test_the_exposition_matches_prometheus_client_metrics(tmp_path: Path) -> None:
    """Names, types, labels, help texts and buckets as prometheus-client's own metric classes give."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    requests = Counter(
        "gateway_requests",
        "Requests by provider, status class and team",
        ["provider", "status_class", "team"],
        registry=registry,
    )
    duration = Histogram(
        "gateway_request_duration_seconds",
        "Whole request, as the client saw it",
        ["provider"],
        buckets=BUCKETS,
        registry=registry,
    )
    ttfb = Histogram(
        "gateway_time_to_first_byte_seconds",
        "Until the response headers were sent",
        ["provider"],
        buckets=BUCKETS,
        registry=registry,
    )
    overhead = Histogram(
        "gateway_overhead_seconds",
        "Time in the gateway itself, not waiting on the upstream",
        ["provider"],
        buckets=OVERHEAD_BUCKETS,
        registry=registry,
    )
    errors = Counter("gateway_upstream_errors", "Upstream failures by kind", ["provider", "kind"], registry=registry)
    streams = Gauge("gateway_streams_in_flight", "Event streams being relayed", registry=registry)
    degraded = Gauge("gateway_store_degraded", "1 while the key store is unreachable", registry=registry)
    Gauge(
        "gateway_limits_degraded",
        "1 while the limits' store (Redis) is unreachable from any worker",
        registry=registry,
    )
    cache = Counter("gateway_auth_cache", "Key lookups by cache result", ["result"], registry=registry)
    Counter(
        "gateway_usage_rows_dropped",
        "Usage ledger rows dropped: the write queue was full, or the store refused the row",
        registry=registry,
    )
    metrics = Metrics(tmp_path)
    for provider, status, team, seconds in (
        ("openai", 200, "t", 0.3),
        ("none", 401, "", 0.0004),
        ("openai", 502, "t", 61.0),
    ):
        metrics.request(provider, status, team, seconds, seconds / 2, seconds / 1000)
        requests.labels(provider, f"{status // 100}xx", team).inc()
        duration.labels(provider).observe(seconds)
        ttfb.labels(provider).observe(seconds / 2)
        overhead.labels(provider).observe(seconds / 1000)
    metrics.upstream_error("openai", "unavailable")
    errors.labels("openai", "unavailable").inc()
    metrics.cache_hits = metrics.cache_misses = 1
    cache.labels("hit").inc()
    cache.labels("miss").inc()
    metrics.streams.inc()
    streams.inc()
    metrics.degraded_probe = lambda: True
    degraded.set(1)

    def lines(text: bytes) -> set[str]:
        return {line for line in text.decode().splitlines() if "_created" not in line}

    assert lines(metrics.exposition()[0]) == lines(generate_latest(registry))


def test_model_series_stay_bounded(tmp_path: Path) -> None:
    """Model names come from requests and answers: past the bound, new ones count as ``other``."""
    import service.core.metrics as metrics_module

    metrics = metrics_module.Metrics(tmp_path / "bounded", pid=os.getpid())
    for n in range(metrics_module.MAX_MODEL_SERIES + 50):
        metrics.usage("openai", f"model-{n}", "t", 1, None, None, None, None, None)
    text = metrics.exposition()[0].decode()
    assert text.count("gateway_unpriced_requests_total{") == metrics_module.MAX_MODEL_SERIES + 1
    assert 'gateway_unpriced_requests_total{model="other",provider="openai"} 50.0' in text
