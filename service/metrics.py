"""Prometheus metrics, correct across uvicorn workers, cheap on the request path.

The request path only adds to plain in-process tallies (a dict increment and a bisect per
histogram); a task publishes the differences to prometheus-client once a second. prometheus-client
runs in multiprocess mode (each worker writes its own memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR``), so a scrape of any worker reports the whole gateway.

Metrics: ``gateway_requests_total{provider,status_class,team}``, ``gateway_request_duration_seconds``,
``gateway_time_to_first_byte_seconds``, ``gateway_overhead_seconds`` (time in the gateway itself,
not waiting on the upstream), ``gateway_upstream_errors_total{provider,kind}``,
``gateway_streams_in_flight``, ``gateway_auth_cache_total{result}``, ``gateway_store_degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FLUSH_SECONDS = 1.0
STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


DIRECTORY_PREFIX = "gateway-metrics-"


def _started(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), or ``None`` when no such process runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_directories(parent: Path) -> None:
    """Remove the metrics directories of gateways that are no longer running (their owner's pid is
    gone, or now belongs to a process started at another time)."""
    for path in parent.glob(DIRECTORY_PREFIX + "*"):
        owner, _, started = path.name.removeprefix(DIRECTORY_PREFIX).partition("-")
        if not owner.isascii() or not owner.isdigit():
            continue
        if _started(int(owner)) != started:
            shutil.rmtree(path, ignore_errors=True)


def multiprocess_directory() -> Path:
    """The directory every worker of this gateway shares (set before prometheus-client is imported).

    ``PROMETHEUS_MULTIPROC_DIR`` when set; otherwise one per uvicorn supervisor (the parent that
    spawned the workers), or per process when it serves alone, named after the owner's pid and
    start time (a reused pid must not inherit old files). Directories of gateways that are gone
    are removed first.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
    else:
        supervisor = multiprocessing.parent_process()
        owner = (supervisor.pid if supervisor is not None else None) or os.getpid()
        parent = Path(tempfile.gettempdir())
        sweep_stale_directories(parent)
        path = parent / f"{DIRECTORY_PREFIX}{owner}-{_started(owner) or '0'}"
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_if_last(path: Path) -> None:
    """Remove a gateway-owned metrics directory once no other process writes into it (the files
    are named ``…_{pid}.db``): the last worker out cleans up."""
    if not path.name.startswith(DIRECTORY_PREFIX):
        return  # an operator's PROMETHEUS_MULTIPROC_DIR is theirs to keep
    me = os.getpid()
    for file in path.glob("*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isascii() and pid.isdigit() and int(pid) != me and _alive(int(pid)):
            return
    shutil.rmtree(path, ignore_errors=True)


class _Row:
    """One provider's observations not yet published: count per bucket (+Inf last) and sum, for
    each of the three histograms."""

    __slots__ = ("duration", "duration_sum", "overhead", "overhead_sum", "ttfb", "ttfb_sum")

    def __init__(self) -> None:
        self.duration = [0] * (len(BUCKETS) + 1)
        self.ttfb = [0] * (len(BUCKETS) + 1)
        self.overhead = [0] * (len(OVERHEAD_BUCKETS) + 1)
        self.duration_sum = self.ttfb_sum = self.overhead_sum = 0.0


def _add(histogram: Any, provider: str, buckets: list[int], total: float) -> None:
    if not any(buckets):
        return
    child = histogram.labels(provider)
    # prometheus-client keeps per-bucket (non-cumulative) values in ``_buckets`` and the total in
    # ``_sum``; adding the differences equals observing each value (pinned 0.26)
    for index, count in enumerate(buckets):
        if count:
            child._buckets[index].inc(count)
    child._sum.inc(total)


class Metrics:
    def __init__(self) -> None:
        self.directory = multiprocess_directory()
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "gateway_requests",
            "Requests by provider, status class and team",
            ["provider", "status_class", "team"],
            registry=None,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request, as the client saw it",
            ["provider"],
            buckets=BUCKETS,
            registry=None,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Until the response headers were sent",
            ["provider"],
            buckets=BUCKETS,
            registry=None,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time in the gateway itself, not waiting on the upstream",
            ["provider"],
            buckets=OVERHEAD_BUCKETS,
            registry=None,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind", ["provider", "kind"], registry=None
        )
        self.streams = Gauge(
            "gateway_streams_in_flight", "Event streams being relayed", multiprocess_mode="livesum", registry=None
        )
        self.store_degraded = Gauge(
            "gateway_store_degraded", "1 while the key store is unreachable", multiprocess_mode="max", registry=None
        )
        self.degraded_probe: Callable[[], bool] = lambda: False
        self.auth_cache = Counter("gateway_auth_cache", "Key lookups by cache result", ["result"], registry=None)
        self._counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self._errors: dict[tuple[str, str], int] = defaultdict(int)
        self._rows: dict[str, _Row] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self._published_hits = self._published_misses = 0
        self._task: asyncio.Task[None] | None = None

    # -- request path: plain arithmetic ----------------------------------------------------------

    def request(
        self, provider: str, status: int, team: str, duration: float, ttfb: float | None, overhead: float | None
    ) -> None:
        self._counts[(provider, STATUS_CLASSES[status // 100], team)] += 1
        row = self._rows.get(provider)
        if row is None:
            row = self._rows[provider] = _Row()
        row.duration[bisect_left(BUCKETS, duration)] += 1
        row.duration_sum += duration
        if ttfb is not None:
            row.ttfb[bisect_left(BUCKETS, ttfb)] += 1
            row.ttfb_sum += ttfb
        if overhead is not None:
            row.overhead[bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
            row.overhead_sum += overhead

    def upstream_error(self, provider: str, kind: str) -> None:
        self._errors[(provider, kind)] += 1

    # -- publishing -----------------------------------------------------------------------------

    def publish(self) -> None:
        self.store_degraded.set(1 if self.degraded_probe() else 0)
        counts, self._counts = self._counts, defaultdict(int)
        for labels, count in counts.items():
            self.requests.labels(*labels).inc(count)
        errors, self._errors = self._errors, defaultdict(int)
        for error_labels, count in errors.items():
            self.upstream_errors.labels(*error_labels).inc(count)
        rows, self._rows = self._rows, {}
        for provider, row in rows.items():
            _add(self.duration, provider, row.duration, row.duration_sum)
            _add(self.ttfb, provider, row.ttfb, row.ttfb_sum)
            _add(self.overhead, provider, row.overhead, row.overhead_sum)
        if self.cache_hits != self._published_hits:
            self.auth_cache.labels("hit").inc(self.cache_hits - self._published_hits)
            self._published_hits = self.cache_hits
        if self.cache_misses != self._published_misses:
            self.auth_cache.labels("miss").inc(self.cache_misses - self._published_misses)
            self._published_misses = self.cache_misses

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever(), name="metrics-publish")

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.publish()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.publish()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        remove_if_last(self.directory)

    def exposition(self) -> tuple[bytes, str]:
        """The whole gateway's metrics (every worker's), in Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        self.publish()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
