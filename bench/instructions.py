"""Instructions per proxied request, counted by callgrind, for the gateway and the bare relay alike.

Each server runs as the load bench starts it (the gateway from its Procfile line, the bare relay
through uvicorn), but under ``valgrind --tool=callgrind``. One keep-alive client in this process sends
the bench's request (the same POST wrk sends, with a real team key) sequentially: ``warmup`` requests,
then ``requests`` measured ones. The server's instruction counter is read live (``callgrind_control
-e``, all threads summed). Timers keep firing while the server is slowed down some 50 times by
callgrind (uvicorn's tick, the gateway's key-cache refresh and metrics publication), so what they
cost per second is measured first, over ``idle`` seconds with no traffic once the warm-up's ledger
rows are written, and subtracted over the measured window, which ends once the measured requests'
own rows are written (the ledger writes at least once a second)::

    per request = (after - before - idle rate * window seconds) / requests

Start-up and warm-up are excluded. Counts repeat to about 0.3% between runs, on a busy machine too.
``python -m bench.instructions`` runs this step alone; ``make bench`` runs it after the load rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import REQUEST_BODY, ROOT, Bench, Server, _create_key, limits_contenders

ALLOW_LIST = {"allowedModels": ["gpt-4o*", "claude-*"], "allowedProviders": ["openai", "anthropic"]}
STARTUP_SECONDS = 300  # a Python server starts in 20-60 s under callgrind on this box
_THREAD_TOTAL = re.compile(r"^\s*Th\s+\d+\s+([\d,]+)\s*$", re.MULTILINE)


def valgrind_command(work: Path, name: str) -> str:
    """The command prefix a server runs under; its profile is written when it stops (unused)."""
    return f"valgrind --tool=callgrind --callgrind-out-file={work}/callgrind.{name}.out --log-file={work}/{name}.vg"


def instructions(pid: int) -> int:
    """Instructions the process has executed since it started (every thread), read without stopping it."""
    out = subprocess.run(["callgrind_control", "-e", str(pid)], capture_output=True, text=True, check=True).stdout
    totals = _THREAD_TOTAL.findall(out)
    if not totals:
        raise RuntimeError(f"callgrind_control gave no totals for {pid}: {out!r}")
    return sum(int(value.replace(",", "")) for value in totals)


class Client:
    """One keep-alive connection sending the bench's request, the headers wrk sends and no others."""

    def __init__(self, server: Server) -> None:
        host, port = server.base.rsplit("//", 1)[1].rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=STARTUP_SECONDS)
        self.path = "/" + server.url.split("/", 3)[3]
        self.body = REQUEST_BODY.encode()
        self.headers = {
            "Host": f"{host}:{port}",
            "Content-Type": "application/json",
            "Authorization": f"Bearer {server.key}",
            "Content-Length": str(len(self.body)),
        }
        self.name = server.name

    def send(self, count: int) -> None:
        for _ in range(count):
            self.connection.putrequest("POST", self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                self.connection.putheader(name, value)
            self.connection.endheaders(self.body)
            response = self.connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{self.name}: {response.status} from {self.path}")
            if response.will_close:
                raise RuntimeError(f"{self.name}: the connection was not kept alive")

    def close(self) -> None:
        self.connection.close()


SETTLE_SECONDS = 2.5
"""Waited after the warm-up and after the measured requests: the usage ledger writes what was queued
at least once a second, so its rows are written inside the window they belong to."""


def count(server: Server, warmup: int, requests: int, idle: float) -> dict[str, float]:
    """One server's figures: net instructions per request, and what they were made of.

    The idle rate is measured before the measured requests, after the warm-up's rows were written;
    the window ends once the measured requests' rows are written too (a rate measured after the
    window would hold the last rows' write, and subtract it many times over)."""
    client = Client(server)
    pid = server.process.pid
    try:
        client.send(warmup)
        time.sleep(SETTLE_SECONDS)
        quiet, quiet_start = instructions(pid), time.monotonic()
        time.sleep(idle)
        before, start = instructions(pid), time.monotonic()
        client.send(requests)
        sent = time.monotonic()
        time.sleep(SETTLE_SECONDS)
        after, end = instructions(pid), time.monotonic()
    finally:
        client.close()
    idle_per_second = (before - quiet) / (start - quiet_start)
    window = end - start
    return {
        "instructions_per_request": (after - before - idle_per_second * window) / requests,
        "gross_instructions_per_request": (after - before) / requests,
        "idle_instructions_per_second": idle_per_second,
        "window_seconds": window,
        "sending_seconds": sent - start,
        "requests": requests,
        "warmup": warmup,
    }


def run(
    bench: Bench,
    upstream: str,
    warmup: int,
    requests: int,
    idle: float,
    gateways: dict[str, Path] | None = None,
    *,
    limits: bool = False,
) -> dict[str, Any]:
    """Start the bare relay and the gateways (name: source tree) under callgrind against ``upstream``,
    count each in turn, stop them. With ``limits``, the first gateway's tree runs twice more, its
    team under a budget and a requests-per-minute limit, in memory and on Redis (as ``bench.run``'s
    limits rows)."""
    started = len(bench.procs)
    servers = [bench.bare(upstream, "cg-bare", wrap=valgrind_command(bench.work, "bare"), wait=STARTUP_SECONDS)]
    gateways = gateways or {"gateway": ROOT}
    contenders: list[tuple[str, Path, dict[str, str] | None]] = [(name, root, None) for name, root in gateways.items()]
    if limits:
        first = next(iter(gateways.values()))
        contenders += [(name, first, settings) for name, settings in limits_contenders().items()]
    for name, root, settings in contenders:
        servers.append(
            bench.gateway(
                f"cg-{name}",
                upstream,
                f"sqlite:///{bench.work}/cg-{name}.db",
                root=root,
                wrap=valgrind_command(bench.work, name),
                wait=STARTUP_SECONDS,
                limits=settings,
            )
        )
    # the same gateway process again, called with a key that has an allow-list: what checking the
    # body's model costs (keys without a list skip it; the "gateway" row is theirs)
    gateway = servers[1]
    listed = dataclasses.replace(
        gateway, name="cg-gateway-allow-list", key=_create_key(gateway.base, STARTUP_SECONDS, ALLOW_LIST)
    )
    servers.insert(2, listed)
    try:
        figures: dict[str, Any] = {
            server.name.removeprefix("cg-"): count(server, warmup, requests, idle) for server in servers
        }
    finally:
        bench.stop(bench.procs[started:])
    bare = figures["bare"]["instructions_per_request"]
    figures["ratios_vs_bare"] = {
        name: row["instructions_per_request"] / bare for name, row in figures.items() if name != "bare"
    }
    figures["ratio_gateway_vs_bare"] = figures["ratios_vs_bare"]["gateway"]
    gateway_count = figures["gateway"]["instructions_per_request"]
    figures["limits_vs_gateway"] = {
        name: figures[name]["instructions_per_request"] / gateway_count
        for name in ("limits-mem", "limits-redis")
        if name in figures
    }
    if "limits-redis" in figures and shutil.which("redis-server"):
        from bench import redis_scripts  # what the same requests cost Redis itself

        figures["redis"] = {name: redis_scripts.count(root) for name, root in gateways.items()}
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    bare = figures["bare"]
    print(
        f"instructions per request (callgrind, {bare['requests']} sequential after {bare['warmup']}, "
        f"idle timers subtracted): bare relay {bare['instructions_per_request'] / 1000:,.1f}k"
    )
    for name, ratio in figures["ratios_vs_bare"].items():
        row = figures[name]
        print(
            f"  {name}: {row['instructions_per_request'] / 1000:,.1f}k, {ratio:.3f}x the bare relay "
            f"({row['gross_instructions_per_request'] / 1000:,.1f}k before subtracting "
            f"{row['idle_instructions_per_second'] / 1000:,.0f}k/s idle)"
        )
    for name, ratio in figures.get("limits_vs_gateway", {}).items():
        print(f"  {name} ÷ gateway (budget + RPM on the team): {ratio:.3f}x")
    if "redis" in figures:
        from bench.redis_scripts import print_row

        for name, row in figures["redis"].items():
            print_row(name, row)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cg-requests", type=int, default=1000, help="measured requests under callgrind")
    parser.add_argument("--cg-warmup", type=int, default=300, help="warm-up requests under callgrind")
    parser.add_argument("--cg-idle", type=float, default=5.0, help="seconds of idle timers measured")
    parser.add_argument(
        "--cg-limits",
        action="store_true",
        help="count the limits rows too (budget + RPM in memory and on Redis; two more servers to start)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    parser.add_argument("--gateway-root", type=Path, default=ROOT, help="the tree the gateway runs from")
    parser.add_argument("--baseline-root", type=Path, default=None, help="another tree's gateway, counted too")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "instructions.json")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"this step needs {tool} (valgrind and nginx are Debian packages)")
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as work:
        bench = Bench(Path(work), 0, 0, use_nginx=True)
        gateways = {"gateway": args.gateway_root.resolve()}
        if args.baseline_root is not None:
            gateways["gateway-base"] = args.baseline_root.resolve()
        try:
            direct = bench.upstream()
            figures = run(
                bench, direct.base, args.cg_warmup, args.cg_requests, args.cg_idle, gateways, limits=args.cg_limits
            )
        finally:
            bench.stop_all()
    figures["roots"] = {name: str(root) for name, root in gateways.items()}
    figures["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print_figures(figures)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
