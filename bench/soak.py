"""``make soak``: the gateway under long, mixed, hostile-ish traffic, watched for leaks.

Two phases against the Procfile's gateway (one worker, SQLite) and the bundled mock upstream:

1. ``streams``: 200 concurrent clients, each streaming one completion after another for
   ``--stream-seconds`` (60): every stream must finish cleanly; the time to the first event is
   reported (p50, p99).
2. ``mixed``: ``--mixed-seconds`` (600) of plain calls, streams, 1 MiB uploads, clients that leave
   mid-stream, unknown keys (401) and slow readers. Every ``--sample-seconds`` (10) the gateway's
   RSS, open descriptors and connections to the upstream are sampled. Pass: RSS growth after the
   warm-up (the first 3 minutes, or third of a shorter run) under 5%, descriptors flat, and no
   upstream connection left once the traffic stops and the pool's idle connections have been closed
   (up to twice its 30 s keep-alive).

Figures go to stdout and ``bench/results/soak-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import ADMIN_KEY, BIN, ROOT, _create_key, _quote, free_port, process_tree, rss_mib, wait_port

STREAM_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
PLAIN_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
POOL_KEEPALIVE_SECONDS = 30
IDLE_WAIT_SECONDS = 2 * POOL_KEEPALIVE_SECONDS + 10
"""aiohttp closes a pooled connection idle past its keep-alive at its next clean-up round, which runs
every keep-alive period: up to twice the keep-alive after the last use."""
WARM_UP_SECONDS = 180
"""Caches (SQLite's pages, the key cache, the ledger's growing file) fill during the first minutes."""


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))


def upstream_connections(port: int) -> int:
    """Established TCP connections to the upstream's port (the gateway's pooled connections)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":
                count += 1
    return count


class Soak:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, command: str, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.work / f"{log}.log").open("ab") as out:
            proc = subprocess.Popen(
                f"exec {command}", shell=True, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.procs.append(proc)
        return proc

    def start(self) -> tuple[str, str, int, subprocess.Popen[bytes]]:
        mock_port, port = free_port(), free_port()
        self.spawn(f"{BIN / 'python'} -m service.mock_upstream", {**os.environ, "PORT": str(mock_port)}, "mock")
        wait_port(mock_port)
        procfile = (ROOT / "Procfile").read_text().split("web:", 1)[1].strip()
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "AI_GATEWAY_URL": f"http://127.0.0.1:{mock_port}",
            "AI_GATEWAY_TOKEN": "",
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": f"sqlite:///{self.work}/gateway.db",
            "LOG_LEVEL": "warning",
        }
        gateway = self.spawn(f"sh -c {_quote(procfile)}", env, "gateway")
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        return base, _create_key(base), mock_port, gateway

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def stream_once(session: aiohttp.ClientSession, url: str, key: str) -> float:
    """One streamed completion read to its end; seconds to the first event."""
    started = time.perf_counter()
    first = None
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    async with session.post(url, data=STREAM_BODY, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        async for _ in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("empty stream")
    return first


async def streams_phase(base: str, key: str, clients: int, seconds: float) -> dict[str, Any]:
    url = f"{base}/openai/v1/chat/completions"
    firsts: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                try:
                    firsts.append(await stream_once(session, url, key))
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                    errors.append(type(exc).__name__ + ": " + str(exc)[:80])

        await asyncio.gather(*(client() for _ in range(clients)))
    ordered = sorted(firsts)
    return {
        "clients": clients,
        "seconds": seconds,
        "streams": len(firsts),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "first_event_p50_ms": round(statistics.median(ordered) * 1000, 2) if ordered else None,
        "first_event_p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2) if ordered else None,
    }


async def mixed_phase(
    base: str, key: str, gateway_pid: int, mock_port: int, seconds: float, sample_every: float
) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    counts: dict[str, int] = {}
    failures: dict[str, int] = {}
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + seconds
    upload = os.urandom(1024 * 1024)

    async def plain(session: aiohttp.ClientSession) -> bool:
        async with session.post(f"{base}/openai/v1/chat/completions", data=PLAIN_BODY, headers=auth) as r:
            await r.read()
            return r.status == 200

    async def stream(session: aiohttp.ClientSession) -> bool:
        await stream_once(session, f"{base}/openai/v1/chat/completions", key)
        return True

    async def large(session: aiohttp.ClientSession) -> bool:
        async with session.post(f"{base}/openai/_mock/echo", data=upload, headers=auth) as r:
            return r.status == 200 and len(await r.read()) == len(upload)

    async def leave(session: aiohttp.ClientSession) -> bool:
        async with session.get(f"{base}/openai/_mock/sse?n=200&interval=0.01", headers=auth) as r:
            await r.content.readany()
            r.close()  # the client goes away mid-stream
        return True

    async def unknown(session: aiohttp.ClientSession) -> bool:
        bad = {"authorization": "Bearer sk_" + os.urandom(32).hex()}
        async with session.get(f"{base}/openai/models", headers=bad) as r:
            await r.read()
            return r.status in (401, 429)

    async def slow(session: aiohttp.ClientSession) -> bool:
        async with session.get(f"{base}/openai/_mock/bytes?n=4194304", headers=auth) as r:
            total = 0
            while chunk := await r.content.read(65536):
                total += len(chunk)
                await asyncio.sleep(0.005)
            return total == 4194304

    kinds = [plain] * 8 + [stream] * 6 + [large, leave, leave, unknown, unknown, slow]

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            kind = random.choice(kinds)
            try:
                ok = await kind(session)
            except (aiohttp.ClientError, RuntimeError, TimeoutError):
                ok = False
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
            if not ok:
                failures[kind.__name__] = failures.get(kind.__name__, 0) + 1

    async def sampler() -> None:
        started = time.monotonic()
        while time.monotonic() < deadline:
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_mib": round(rss_mib(gateway_pid), 1),
                    "fds": open_fds(gateway_pid),
                    "upstream_connections": upstream_connections(mock_port),
                }
            )
            await asyncio.sleep(sample_every)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=timeout) as session:
        await asyncio.gather(sampler(), *(worker(session) for _ in range(32)))
    idle_deadline = time.monotonic() + IDLE_WAIT_SECONDS
    while upstream_connections(mock_port) and time.monotonic() < idle_deadline:
        await asyncio.sleep(1)
    warm = [sample for sample in samples if sample["t"] >= min(WARM_UP_SECONDS, seconds / 3)] or samples
    growth = (warm[-1]["rss_mib"] - warm[0]["rss_mib"]) / warm[0]["rss_mib"] * 100
    return {
        "seconds": seconds,
        "requests": counts,
        "failures": failures,
        "rss_warm_mib": warm[0]["rss_mib"],
        "rss_end_mib": warm[-1]["rss_mib"],
        "rss_growth_after_warmup_pct": round(growth, 2),
        "fds_warm": warm[0]["fds"],
        "fds_end": warm[-1]["fds"],
        "fds_max": max(s["fds"] for s in samples),
        "upstream_connections_max": max(s["upstream_connections"] for s in samples),
        "upstream_connections_after_idle": upstream_connections(mock_port),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream-seconds", type=float, default=60)
    parser.add_argument("--stream-clients", type=int, default=200)
    parser.add_argument("--mixed-seconds", type=float, default=600)
    parser.add_argument("--sample-seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        soak = Soak(Path(tmp))
        try:
            base, key, mock_port, gateway = soak.start()
            result: dict[str, Any] = {
                "streams": asyncio.run(streams_phase(base, key, args.stream_clients, args.stream_seconds))
            }
            print(json.dumps(result["streams"], indent=2), flush=True)
            result["mixed"] = asyncio.run(
                mixed_phase(base, key, gateway.pid, mock_port, args.mixed_seconds, args.sample_seconds)
            )
            gateway_log = (Path(tmp) / "gateway.log").read_text()
        finally:
            soak.stop()
    mixed = {k: v for k, v in result["mixed"].items() if k != "samples"}
    print(json.dumps(mixed, indent=2))
    result["tracebacks_in_log"] = gateway_log.count("Traceback")
    verdict = (
        result["streams"]["errors"] == 0
        and mixed["rss_growth_after_warmup_pct"] < 5
        and mixed["upstream_connections_after_idle"] == 0
        and result["tracebacks_in_log"] == 0
    )
    result["pass"] = verdict
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"soak {'passed' if verdict else 'FAILED'}; figures in {path}")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
