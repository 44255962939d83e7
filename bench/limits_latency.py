"""Where the limits' added latency goes, one request at a time: the gateway's own time before the
upstream (its ``server-timing: gateway;dur=…``, which holds the admission's round trip to Redis) and
the client's whole request, for the gateway without limits, with a budget and an RPM limit in memory,
and on Redis placed three ways: this machine's Redis as it runs (any core), and a private
``redis-server`` pinned to the gateway's core or to the other one.

Every gateway starts from its Procfile pinned to core 0, as in ``bench.run``; the upstream is its nginx
on core 1, and so is the client. It sends the bench's request in blocks of 100 per gateway, the gateways in turn,
``rounds`` times (the first round is a warm-up), over one keep-alive connection each, and the medians
are printed (not asserted anywhere)::

    .venv/bin/python -m bench.limits_latency [--rounds 12]

A Redis that must be woken on another core answers later than one sharing the gateway's core: on a
virtual machine an idle virtual CPU takes tens of microseconds to wake, twice per round trip. The same
shows in a thread hop (``asyncio.to_thread``): ~20 µs of CPU with both threads on one core, ~80 µs on
two, on the bench machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.run import REQUEST_BODY, ROOT, Bench, Server, free_port, limits_contenders, pin_harness, wait_port

BLOCK = 100


def _private_redis(bench: Bench, core: int) -> str:
    """A ``redis-server`` of its own (no persistence) pinned to ``core``; its URL."""
    port = free_port()
    redis_server = shutil.which("redis-server") or "redis-server"
    command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    bench.spawn([*command, "--dir", str(bench.work)], core, log=f"redis-{core}")
    wait_port(port)
    return f"redis://127.0.0.1:{port}/0"


def _timings(server: Server, connection: http.client.HTTPConnection, count: int) -> list[tuple[float, float]]:
    """``count`` requests: each one's (gateway's own ms before the upstream, client's whole ms)."""
    path = "/" + server.url.split("/", 3)[3]
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    out = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", path, REQUEST_BODY, headers)
        response = connection.getresponse()
        response.read()
        whole = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"{server.name}: {response.status}")
        timing = response.getheader("server-timing") or ""
        if "gateway;dur=" not in timing:
            raise RuntimeError(f"{server.name}: no gateway;dur in server-timing ({timing!r})")
        gateway = float(timing.split("gateway;dur=", 1)[1].split(",", 1)[0])
        out.append((gateway, whole))
    return out


def run(rounds: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="limits-latency-") as work:
        bench = Bench(Path(work), 0, 0, use_nginx=True)
        try:
            upstream = bench.upstream().base
            contenders = limits_contenders()
            settings: dict[str, dict[str, str] | None] = {"gateway": None, "limits-mem": contenders["limits-mem"]}
            if "limits-redis" in contenders:
                system = contenders["limits-redis"]
                settings["limits-redis"] = system
                if shutil.which("redis-server"):
                    for name, core in (("limits-redis-same-core", 0), ("limits-redis-other-core", 1)):
                        settings[name] = {**system, "REDIS_URL": _private_redis(bench, core)}
            servers = [
                bench.gateway(name, upstream, f"sqlite:///{work}/{name}.db", ROOT, limits=extra)
                for name, extra in settings.items()
            ]
            connections = {}
            for server in servers:
                host, port = server.base.rsplit("//", 1)[1].rsplit(":", 1)
                connections[server.name] = http.client.HTTPConnection(host, int(port), timeout=30)
            samples: dict[str, list[tuple[float, float]]] = {server.name: [] for server in servers}
            for number in range(rounds):
                for server in servers:
                    block = _timings(server, connections[server.name], BLOCK)
                    if number:  # the first round warms every gateway up
                        samples[server.name] += block
        finally:
            bench.stop_all()
    figures = {
        name: {
            "gateway_ms": statistics.median(gateway for gateway, _ in rows),
            "client_ms": statistics.median(whole for _, whole in rows),
        }
        for name, rows in samples.items()
    }
    base = figures["gateway"]
    for row in figures.values():
        row["added_gateway_ms"] = row["gateway_ms"] - base["gateway_ms"]
        row["added_client_ms"] = row["client_ms"] - base["client_ms"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=12, help="blocks of 100 per gateway (the first a warm-up)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "limits_latency.json")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2 (the first is a warm-up)")
    pin_harness()
    figures = run(args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"{'':26} {'gateway before upstream':>24} {'client, whole request':>24}")
    for name, row in figures.items():
        print(
            f"{name:26} {row['gateway_ms'] * 1000:10.0f} µs ({row['added_gateway_ms'] * 1000:+5.0f})"
            f" {row['client_ms'] * 1000:12.0f} µs ({row['added_client_ms'] * 1000:+5.0f})"
        )
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
