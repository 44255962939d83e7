"""Prometheus metrics, correct across uvicorn workers, cheap on the request path.

The request path only adds to plain in-process tallies (a dict increment and a bisect per
histogram: no lock, no I/O, no prometheus-client call). Once a second each worker writes its
cumulative tallies to a small JSON file of its own in a directory all workers of the gateway share
(``worker-<pid>-<start>.json``, replaced atomically). A scrape of any worker publishes that worker's
latest tallies, then sums every worker's file in a custom prometheus-client collector, so it
reports the whole gateway. Only prometheus-client's public API is used: a collector yielding
metric families, registered on a ``CollectorRegistry`` and rendered by ``generate_latest``.

Counters and histograms of workers that have exited stay counted (their file remains, so totals
never go backwards); the gauges count live workers only (a worker zeroes its gauges on a clean
stop, and a worker whose pid is gone is left out).

Metrics: ``gateway_requests_total{provider,status_class,team}``, ``gateway_request_duration_seconds``,
``gateway_time_to_first_byte_seconds``, ``gateway_overhead_seconds`` (time in the gateway itself,
not waiting on the upstream), ``gateway_upstream_errors_total{provider,kind}``,
``gateway_streams_in_flight``, ``gateway_auth_cache_total{result}``, ``gateway_store_degraded``,
``gateway_limits_degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FLUSH_SECONDS = 1.0
MAX_MODEL_SERIES = 1000
"""Distinct (provider, model) pairs per worker in the token and cost metrics; later ones count as ``other``."""
OTHER_MODEL = "other"
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
"""The ``kind`` label of ``gateway_tokens``, in the order ``Metrics.usage`` takes the counts."""
STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

DIRECTORY_PREFIX = "gateway-metrics-"
WORKER_PREFIX = "worker-"

# name, help text, bucket bounds of the three per-provider histograms (keys of the worker files)
HISTOGRAMS = {
    "duration": ("gateway_request_duration_seconds", "Whole request, as the client saw it", BUCKETS),
    "ttfb": ("gateway_time_to_first_byte_seconds", "Until the response headers were sent", BUCKETS),
    "overhead": (
        "gateway_overhead_seconds",
        "Time in the gateway itself, not waiting on the upstream",
        OVERHEAD_BUCKETS,
    ),
}

log = structlog.get_logger("gateway.metrics")


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


def shared_directory() -> tuple[Path, bool]:
    """The directory every worker of this gateway shares, and whether the gateway owns it.

    ``PROMETHEUS_MULTIPROC_DIR`` when set (the operator's: never removed); otherwise one per uvicorn
    supervisor (the parent that spawned the workers), or per process when it serves alone, under
    the temporary directory, named after the owner's pid and start time (a reused pid must not
    inherit old files). Directories of gateways that are gone are removed first. Nothing is created
    here and the environment is left as it is.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        return Path(configured), False
    supervisor = multiprocessing.parent_process()
    owner = (supervisor.pid if supervisor is not None else None) or os.getpid()
    parent = Path(tempfile.gettempdir())
    sweep_stale_directories(parent)
    return parent / f"{DIRECTORY_PREFIX}{owner}-{_started(owner) or '0'}", True


def _worker_pid(file: Path) -> int | None:
    """The pid in a worker file's name (``worker-<pid>-<start>.json``)."""
    pid = file.name.removeprefix(WORKER_PREFIX).partition("-")[0]
    return int(pid) if pid.isascii() and pid.isdigit() else None


def _read(file: Path) -> dict[str, Any] | None:
    try:
        document = orjson.loads(file.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None  # gone meanwhile, or not ours
    return document if isinstance(document, dict) else None


def worker_files(directory: Path) -> Iterator[Path]:
    return directory.glob(WORKER_PREFIX + "*.json")


def remove_if_last(path: Path) -> None:
    """Remove a gateway-owned metrics directory once no other worker still writes into it: the last
    worker out cleans up.

    A worker writes its final file (marked ``stopped``) before it looks at the others, so of workers
    stopping together at least the last to write sees every other one stopped, and removes it.
    Workers whose pid is gone (killed without a clean stop) do not hold the directory either.
    """
    if not path.name.startswith(DIRECTORY_PREFIX):
        return  # an operator's PROMETHEUS_MULTIPROC_DIR is theirs to keep
    for file in worker_files(path):
        pid = _worker_pid(file)
        if pid is None or not _alive(pid):
            continue
        document = _read(file)
        if document is None or not document.get("stopped"):
            return
    shutil.rmtree(path, ignore_errors=True)


class _Row:
    """One provider's observations: count per bucket (not cumulative, +Inf last) and sum, for each
    of the three histograms."""

    __slots__ = ("duration", "duration_sum", "overhead", "overhead_sum", "ttfb", "ttfb_sum")

    def __init__(self) -> None:
        self.duration = [0] * (len(BUCKETS) + 1)
        self.ttfb = [0] * (len(BUCKETS) + 1)
        self.overhead = [0] * (len(OVERHEAD_BUCKETS) + 1)
        self.duration_sum = self.ttfb_sum = self.overhead_sum = 0.0


class InFlight:
    """This worker's event streams being relayed (``gateway_streams_in_flight``): a plain integer
    behind ``inc()`` / ``dec()``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Totals:
    """Worker documents summed: counters and histograms of every worker, gauges of live ones."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.upstream_errors: dict[tuple[str, str], int] = defaultdict(int)
        self.auth_cache: dict[str, int] = defaultdict(int)
        self.tokens: dict[tuple[str, ...], int] = defaultdict(int)
        self.cost: dict[tuple[str, ...], int] = defaultdict(int)
        self.unpriced: dict[tuple[str, ...], int] = defaultdict(int)
        self.usage_rows_dropped = 0
        self.histograms: dict[str, dict[str, tuple[list[int], float]]] = {name: {} for name in HISTOGRAMS}
        self.streams = 0
        self.degraded = 0
        self.limits_degraded = 0

    def add(self, document: dict[str, Any], live: bool) -> None:
        for provider, status_class, team, count in document.get("requests", ()):
            self.requests[(provider, status_class, team)] += count
        for provider, kind, count in document.get("upstream_errors", ()):
            self.upstream_errors[(provider, kind)] += count
        for result, count in document.get("auth_cache", {}).items():
            self.auth_cache[result] += count
        self.usage_rows_dropped += document.get("usage_rows_dropped", 0)
        for name in ("tokens", "cost", "unpriced"):
            mine = getattr(self, name)
            for *labels, count in document.get(name, ()):
                mine[tuple(labels)] += count
        for name, rows in document.get("histograms", {}).items():
            mine = self.histograms.get(name)
            if mine is None:
                continue
            size = len(HISTOGRAMS[name][2]) + 1
            for provider, (buckets, total) in rows.items():
                if len(buckets) != size:
                    continue  # written with other buckets (an older version in a kept directory)
                known = mine.get(provider)
                if known is None:
                    mine[provider] = (list(buckets), total)
                else:
                    mine[provider] = ([a + b for a, b in zip(known[0], buckets, strict=True)], known[1] + total)
        if live and not document.get("stopped"):
            self.streams += document.get("streams", 0)
            self.degraded = max(self.degraded, document.get("degraded", 0))
            self.limits_degraded = max(self.limits_degraded, document.get("limits_degraded", 0))

    def families(self) -> Iterator[Metric]:
        """The metric families, with today's names, types, labels, help texts and buckets."""
        degraded = GaugeMetricFamily("gateway_store_degraded", "1 while the key store is unreachable")
        degraded.add_metric([], self.degraded)
        yield degraded
        limits = GaugeMetricFamily(
            "gateway_limits_degraded", "1 while the limits' store (Redis) is unreachable from any worker"
        )
        limits.add_metric([], self.limits_degraded)
        yield limits
        requests = CounterMetricFamily(
            "gateway_requests",
            "Requests by provider, status class and team",
            labels=["provider", "status_class", "team"],
        )
        for request_labels, count in self.requests.items():
            requests.add_metric(request_labels, count)
        yield requests
        errors = CounterMetricFamily(
            "gateway_upstream_errors", "Upstream failures by kind", labels=["provider", "kind"]
        )
        for error_labels, count in self.upstream_errors.items():
            errors.add_metric(error_labels, count)
        yield errors
        yield from self.usage_families()
        cache = CounterMetricFamily("gateway_auth_cache", "Key lookups by cache result", labels=["result"])
        for result, count in self.auth_cache.items():
            if count:
                cache.add_metric([result], count)
        yield cache
        for key, (name, documentation, bounds) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, documentation, labels=["provider"])
            les = [repr(float(bound)) for bound in bounds] + ["+Inf"]
            for provider, (buckets, total) in self.histograms[key].items():
                cumulative, running = [], 0
                for le, count in zip(les, buckets, strict=True):
                    running += count
                    cumulative.append((le, float(running)))
                if running:
                    histogram.add_metric([provider], cumulative, total)
            yield histogram
        streams = GaugeMetricFamily("gateway_streams_in_flight", "Event streams being relayed")
        streams.add_metric([], self.streams)
        yield streams

    def usage_families(self) -> Iterator[Metric]:
        """Tokens, cost and unpriced requests; with ``METRICS_TEAM_LABELS`` a ``team`` label too
        (the last label of each tally, present only then)."""
        teams = any(len(labels) == 4 for labels in self.tokens) or any(len(labels) == 3 for labels in self.cost)
        extra = ["team"] if teams else []
        tokens = CounterMetricFamily(
            "gateway_tokens", "Tokens by provider, model and kind", labels=["provider", "model", "kind", *extra]
        )
        for labels, count in self.tokens.items():
            tokens.add_metric(_fit(labels, 3 + len(extra)), count)
        cost = CounterMetricFamily(
            "gateway_cost_usd", "Cost of priced requests in USD", labels=["provider", "model", *extra]
        )
        for labels, micro in self.cost.items():
            cost.add_metric(_fit(labels, 2 + len(extra)), micro / 1_000_000)
        unpriced = CounterMetricFamily(
            "gateway_unpriced_requests",
            "Metered requests whose model has no price",
            labels=["provider", "model", *extra],
        )
        for labels, count in self.unpriced.items():
            unpriced.add_metric(_fit(labels, 2 + len(extra)), count)
        dropped = CounterMetricFamily(
            "gateway_usage_rows_dropped",
            "Usage ledger rows dropped: the write queue was full, or the store refused the row",
        )
        dropped.add_metric([], self.usage_rows_dropped)
        families = (tokens, cost, unpriced, dropped)  # the drops at 0 too: an alert needs the series
        yield from (family for family in families if family.samples)  # none before metering


def _fit(labels: tuple[str, ...], size: int) -> list[str]:
    """Label values padded (an empty team) or cut to the family's label count: workers started with
    and without ``METRICS_TEAM_LABELS`` may share an operator's directory."""
    return [*labels[:size], *[""] * (size - len(labels))]


class GatewayCollector(Collector):
    """A prometheus-client collector reporting the whole gateway: on each collection it publishes
    this worker's latest tallies, then sums every worker's file in the shared directory."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        mine = self.metrics.publish()
        totals = Totals()
        totals.add(mine, live=True)
        directory = self.metrics.directory
        if directory is not None:
            for file in worker_files(directory):
                if file.name == self.metrics.file_name:
                    continue  # this worker's figures are the ones just taken
                pid = _worker_pid(file)
                document = _read(file)
                if pid is not None and document is not None:
                    totals.add(document, live=_alive(pid))
        return list(totals.families())

    def describe(self) -> Iterable[Metric]:
        return list(Totals().families())


class Metrics:
    """One worker's metrics: tallies on the request path, published to the shared directory.

    Construction only sets attributes (no environment writes, no /proc reads, no files); the
    directory is decided in ``start()`` unless given here. ``pid`` (this process's by default)
    names the worker's file and decides whether its gauges count; in-process tests give two
    instances different ones to stand in for two workers. The call sites use ``request()``,
    ``upstream_error()``, ``cache_hits`` / ``cache_misses`` (plain integers), ``streams.inc()`` /
    ``streams.dec()``, ``degraded_probe``, ``start()``, ``stop()`` and ``exposition()``.
    """

    def __init__(self, directory: Path | None = None, *, pid: int | None = None, team_labels: bool = False) -> None:
        self.directory = directory
        self.team_labels = team_labels
        self.pid = pid
        self.file_name = ""  # set in start(): worker-<pid>-<start>.json
        self._owned = False  # whether stop() may remove the directory (never an operator's)
        self._stopped = False
        self._last_written: bytes | None = b""  # None after a failed write
        self._counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self._errors: dict[tuple[str, str], int] = defaultdict(int)
        self._usage: dict[tuple[str, ...], list[int]] = {}
        """By (provider, model[, team]): tokens by ``TOKEN_KINDS``, then the cost (micro-dollars) and
        count of priced requests, then the count of unpriced ones: one lookup per metered response,
        spread into the token, cost and unpriced series when published."""
        self._models: set[tuple[str, str]] = set()
        self._rows: dict[str, _Row] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.streams = InFlight()
        self.degraded_probe: Callable[[], bool] = lambda: False
        self.limits_degraded_probe: Callable[[], bool] = lambda: False
        self.dropped_probe: Callable[[], int] = lambda: 0
        """Usage ledger rows dropped by this worker (a full queue), read when publishing."""
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(self))

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

    def usage(
        self,
        provider: str,
        model: str,
        team: str,
        input_tokens: int | None,
        output_tokens: int | None,
        cache_read: int | None,
        cache_write: int | None,
        reasoning: int | None,
        cost: int | None,
    ) -> None:
        """One metered response: its token counts by kind, and its cost (``None``: unpriced)."""
        sums = self._usage.get((provider, model, team) if self.team_labels else (provider, model))
        if sums is None:
            sums = self._new_usage_series(provider, model, team)
        if input_tokens:  # None (not reported) and 0 add nothing
            sums[0] += input_tokens
        if output_tokens:
            sums[1] += output_tokens
        if cache_read:
            sums[2] += cache_read
        if cache_write:
            sums[3] += cache_write
        if reasoning:
            sums[4] += reasoning
        if cost is None:
            sums[7] += 1
        else:
            sums[5] += cost
            sums[6] += 1

    def _new_usage_series(self, provider: str, model: str, team: str) -> list[int]:
        if (provider, model) not in self._models:
            if len(self._models) >= MAX_MODEL_SERIES:
                model = OTHER_MODEL  # model names come from requests and answers: the series stay bounded
            else:
                self._models.add((provider, model))
        labels = (provider, model, team) if self.team_labels else (provider, model)
        return self._usage.setdefault(labels, [0] * (len(TOKEN_KINDS) + 3))

    # -- publishing -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This worker's cumulative tallies as a JSON-able document (the worker file's content)."""
        stopped = self._stopped
        return {
            "pid": self.pid,
            "stopped": stopped,
            "requests": [[*labels, count] for labels, count in self._counts.items()],
            "upstream_errors": [[*labels, count] for labels, count in self._errors.items()],
            "auth_cache": {"hit": self.cache_hits, "miss": self.cache_misses},
            "tokens": [
                [*labels[:2], kind, *labels[2:], sums[n]]
                for labels, sums in self._usage.items()
                for n, kind in enumerate(TOKEN_KINDS)
                if sums[n]
            ],
            "cost": [[*labels, sums[5]] for labels, sums in self._usage.items() if sums[6]],
            "unpriced": [[*labels, sums[7]] for labels, sums in self._usage.items() if sums[7]],
            "usage_rows_dropped": self.dropped_probe(),
            "histograms": {
                "duration": {p: (r.duration, r.duration_sum) for p, r in self._rows.items()},
                "ttfb": {p: (r.ttfb, r.ttfb_sum) for p, r in self._rows.items()},
                "overhead": {p: (r.overhead, r.overhead_sum) for p, r in self._rows.items()},
            },
            "streams": 0 if stopped else self.streams.value,
            "degraded": 0 if stopped else int(self.degraded_probe()),
            "limits_degraded": 0 if stopped else int(self.limits_degraded_probe()),
        }

    def publish(self) -> dict[str, Any]:
        """Write this worker's tallies to its file (temp file + ``os.replace``, so readers see the
        old document or the new one, never half of one; skipped when nothing changed) and return
        them. Before ``start()`` nothing is written. A failed write (a full disk, a removed
        directory) is logged once per run of failures and retried at the next publish."""
        document = self.snapshot()
        if self.directory is None or not self.file_name:
            return document
        body = orjson.dumps(document)
        if body != self._last_written:
            temporary = self.directory / f".{self.file_name}.tmp"
            try:
                temporary.write_bytes(body)
                os.replace(temporary, self.directory / self.file_name)
            except OSError as exc:
                if self._last_written is not None:
                    log.warning("metrics_publish_failed", directory=str(self.directory), error=str(exc))
                self._last_written = None
            else:
                self._last_written = body
        return document

    async def start(self) -> None:
        """Decide the shared directory (unless given), publish once, then once a second."""
        if self.directory is None:
            self.directory, self._owned = shared_directory()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.pid is None:
            self.pid = os.getpid()
        self.file_name = f"{WORKER_PREFIX}{self.pid}-{_started(self.pid) or time.time_ns()}.json"
        self._stopped = False
        self.publish()
        self._task = asyncio.create_task(self._publish_forever(), name="metrics-publish")

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.publish()

    async def stop(self) -> None:
        """Publish the final tallies with this worker's gauges zeroed; the last worker out removes
        a directory the gateway created."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._stopped = True
        if self.directory is None:
            return
        self.publish()
        if self._owned:
            remove_if_last(self.directory)

    def exposition(self) -> tuple[bytes, str]:
        """The whole gateway's metrics (every worker's), in Prometheus text format, with its
        content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
