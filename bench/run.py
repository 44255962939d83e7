"""``make bench``: what the gateway adds to a call, as ratios against references measured in the same run.

Contenders, each pinned with ``taskset`` to core 0 (the load generator and the upstream get core 1):

- ``direct``: wrk straight at the upstream (nginx serving a static completion);
- ``nginx``: nginx as a plain reverse proxy, the floor for any proxy;
- ``bare``: bench/bare_relay.py, uvicorn + raw ASGI + one aiohttp session, the floor of this stack;
- ``gateway``: the real Procfile command, one worker, with a real team key;
- ``limits-mem`` and ``limits-redis``: the same gateway, its team under a budget and a requests-per-minute
  limit (never reached), kept in memory and in this machine's Redis (``REDIS_URL``): what limits cost on
  the proxied path (load rounds only);
- ``2-workers-0`` and ``2-workers-0,1``: the gateway with ``WEB_CONCURRENCY=2``, pinned to core 0 like the
  one-worker gateway, and to both cores (load rounds only; CPU summed over all its processes).

Rounds are interleaved (every contender once per round, several rounds) and medians reported, since
this shared 2-core machine is noisy. Figures: added latency at 1 connection, req/s and p99 at 32
connections, CPU time per request (utime+stime of the server's processes ÷ requests), added time to the
first and last event of a 100-event SSE stream, and RSS idle, under load, relaying 1 GiB and holding
100 slow streams. Then, on the bare relay and the gateway: 2,000 idle keep-alive client connections
(RSS per connection, latency while they are held) and 1,000 concurrent streams (first events, RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from service.server import KEEP_ALIVE_SECONDS, raise_open_files_limit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
ADMIN_KEY = "bench-admin-key"
COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench upstream"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}'
)
REQUEST_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
SETTLE_SECONDS = 2  # for the last ledger batch (written once a second) before a quiet measurement
SSE_STREAMS = 50
"""Streams timed per server and round for the SSE row (their median): at 15 the median moved by up to
0.1 ms from run to run, as much as the target's margin."""
CLIENT_CORE = 1
"""The core wrk, curl and the upstream run on (servers under test run on core 0). The harness's own
clients (the SSE timings, the idle connections, the streams, the instructions step's client) run there
too (``pin_harness``): left to float, the SSE client shared core 0 with the gateway, and every
microsecond the gateway spent on a stream's later events delayed the client's reading of the first."""
WORKER_ROWS = {"2-workers-0": "0", "2-workers-0,1": "0,1"}
"""The two-worker gateways and the cores each is pinned to: ``2-workers-0`` gets core 0 as the one-worker
gateway does (the same CPU and the same load, so CPU per request compares like for like),
``2-workers-0,1`` both cores, which it shares with wrk and the upstream."""
MISS_SCRIPT = """
local hex = "0123456789abcdef"
local body = '%s'
local unused = "%s"
request = function()
  local t = {}
  for i = 1, 64 do local r = math.random(1, 16); t[i] = hex:sub(r, r) end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer sk_" .. table.concat(t)}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def pin_harness() -> None:
    """This process, and the threads and processes it starts unpinned, on ``CLIENT_CORE``."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > CLIENT_CORE:
        os.sched_setaffinity(0, {CLIENT_CORE})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += process_tree(int(child))
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_mib(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_ns(pid: int) -> int:
    """On-CPU time of the live threads of the process and its descendants (schedstat: in nanoseconds,
    where ``cpu_seconds`` counts clock ticks of 10 ms), for short windows."""
    total = 0
    for p in process_tree(pid):
        for task in Path(f"/proc/{p}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread just ended
                total += int((task / "schedstat").read_text().split()[0])
    return total


def open_files_limit(pid: int) -> int:
    """The lowest soft limit on open files among the process and its descendants."""
    limits = []
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                limits.append(int(line.split()[3]))
    return min(limits)


def busiest_worker_share(pid: int) -> float:
    """The busiest worker's share of the CPU time of a supervisor's workers (0.5: evenly split by two)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    workers = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    seconds = [cpu_seconds(w) for w in workers]
    return max(seconds) / sum(seconds)


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (``Content-Length`` or chunked, no trailers); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (ln.partition(b":") for ln in lines[1:])}
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        size = -1
        while size:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
    return int(lines[0].split()[1])


@dataclass
class Server:
    name: str
    url: str  # the completion URL a client calls
    base: str  # scheme://host:port
    process: subprocess.Popen[bytes]
    key: str = "none"
    """The team key it is called with (the references ignore it)."""
    results: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.results.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.results.get(metric)
        return statistics.median(values) if values else None


class Bench:
    def __init__(
        self,
        work: Path,
        duration: float,
        rounds: int,
        use_nginx: bool = True,
        gateway_root: Path = ROOT,
        baseline_root: Path | None = None,
    ) -> None:
        self.work = work
        self.gateway_root = gateway_root
        self.baseline_root = baseline_root
        """Another tree's gateway measured beside this one as ``gateway-base`` (before and after a change)."""
        self.use_nginx = use_nginx
        self.big_path = "/openai/big" if use_nginx else f"/openai/_mock/bytes?n={1024**3}"
        self.duration = duration
        self.rounds = rounds
        self.procs: list[subprocess.Popen[bytes]] = []
        self.callgrind: tuple[int, int, float] | None = None
        """(warm-up requests, measured requests, idle seconds) for the instructions step, or None."""
        self.workers = True
        """Whether the two-worker gateways (``WORKER_ROWS``) join the load rounds."""
        self.idle_clients = 2000
        self.streams = 1000
        """Idle keep-alive connections, and concurrent streams, held open on the gateway (0: skip the step)."""
        self.callgrind_limits = False
        """Whether the instructions step counts the limits rows too."""

    def spawn(
        self,
        command: list[str] | str,
        core: int | str,
        env: dict[str, str] | None = None,
        log: str = "out",
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        shell = isinstance(command, str)
        args: Any = f"exec taskset -c {core} {command}" if shell else ["taskset", "-c", str(core), *command]
        with (self.work / f"{log}.log").open("ab") as out:
            proc = subprocess.Popen(
                args,
                shell=shell,
                env=env or os.environ.copy(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        self.stop(self.procs)

    def stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # -- servers ------------------------------------------------------------------------------

    def nginx(self, name: str, server_block: str, core: int) -> subprocess.Popen[bytes]:
        temp = self.work / f"{name}-tmp"
        temp.mkdir(exist_ok=True)
        conf = self.work / f"{name}.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; master_process on;
pid {self.work}/{name}.pid; error_log {self.work}/{name}.err;
user root;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
  client_body_temp_path {temp}/b; proxy_temp_path {temp}/p; fastcgi_temp_path {temp}/f;
  uwsgi_temp_path {temp}/u; scgi_temp_path {temp}/s;
  sendfile on; tcp_nopush on;
  {server_block}
}}
""")
        return self.spawn(["nginx", "-c", str(conf), "-p", str(self.work)], core, log=name)

    def upstream(self) -> Server:
        """The upstream (nginx serving the static completion and the 1 GiB file, streams proxied to
        the bundled mock; the mock alone without nginx), as the ``direct`` contender."""
        mock_port, up_port = free_port(), free_port()
        env = {**os.environ, "PORT": str(mock_port), "AI_GATEWAY_TOKEN": ""}
        mock_proc = self.spawn([str(BIN / "python"), "-m", "service.mock_upstream"], 1, env, log="mock")
        if not self.use_nginx:
            wait_port(mock_port)
            mock = f"http://127.0.0.1:{mock_port}"
            return Server("direct", f"{mock}/openai/chat/completions", mock, mock_proc)
        big = self.work / "big.bin"
        with big.open("wb") as handle:
            handle.truncate(1024**3)
        upstream_proc = self.nginx(
            "upstream",
            f"""
  server {{
    listen 127.0.0.1:{up_port} backlog=4096;
    location /openai/_mock/ {{ proxy_pass http://127.0.0.1:{mock_port}; proxy_buffering off;
                               proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /openai/big {{ default_type application/octet-stream; alias {big}; }}
    location / {{ default_type application/json; return 200 '{COMPLETION}'; }}
  }}""",
            core=1,
        )
        wait_port(up_port)
        wait_port(mock_port)
        upstream = f"http://127.0.0.1:{up_port}"
        return Server("direct", f"{upstream}/openai/chat/completions", upstream, upstream_proc)

    def start(self) -> tuple[Server, list[Server]]:
        direct = self.upstream()
        if not self.use_nginx:
            return direct, self._python_proxies(direct.base)
        np_port = free_port()
        nginx_proc = self.nginx(
            "proxy",
            f"""
  upstream up {{ server {direct.base.removeprefix("http://")}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{np_port} backlog=4096;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
                  proxy_buffering off; proxy_request_buffering off; }}
  }}""",
            core=0,
        )
        wait_port(np_port)
        nginx = Server(
            "nginx",
            f"http://127.0.0.1:{np_port}/openai/chat/completions",
            f"http://127.0.0.1:{np_port}",
            nginx_proc,
        )
        return direct, [nginx, *self._python_proxies(direct.base)]

    def bare(self, upstream: str, name: str = "bare", wrap: str = "", wait: float = 20) -> Server:
        """bench/bare_relay.py through uvicorn; ``wrap`` is a command prefix (valgrind) for it."""
        port = free_port()
        command = [
            *wrap.split(),
            str(BIN / "python"),
            "-m",
            "uvicorn",
            "bench.bare_relay:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--timeout-keep-alive",  # the gateway's, for the idle connections step
            str(KEEP_ALIVE_SECONDS),
        ]
        process = self.spawn(command, 0, {**os.environ, "UPSTREAM_URL": upstream}, log=name)
        wait_port(port, wait)
        base = f"http://127.0.0.1:{port}"
        return Server(name, f"{base}/openai/chat/completions", base, process)

    def _python_proxies(self, upstream: str) -> list[Server]:
        servers = [
            self.bare(upstream),
            self.gateway("gateway", upstream, f"sqlite:///{self.work}/gateway.db", self.gateway_root),
            # the same gateway without metering: what reading usage and writing the ledger cost (issue 11)
            self.gateway(
                "metering-off",
                upstream,
                f"sqlite:///{self.work}/metering-off.db",
                self.gateway_root,
                settings={"USAGE_METERING": "false"},
            ),
        ]
        for name, settings in limits_contenders().items():
            database = f"sqlite:///{self.work}/{name}.db"
            servers.append(self.gateway(name, upstream, database, self.gateway_root, limits=settings))
        if self.baseline_root is not None:
            servers.append(
                self.gateway("gateway-base", upstream, f"sqlite:///{self.work}/gateway-base.db", self.baseline_root)
            )
        pg_url = _postgres_schema()
        if pg_url is None:
            print("PostgreSQL is not reachable: the gateway-pg row is left out", file=sys.stderr)
        else:
            servers.append(self.gateway("gateway-pg", upstream, pg_url, self.gateway_root))
        return servers

    def gateway(
        self,
        name: str,
        upstream: str,
        database_url: str,
        root: Path = ROOT,
        wrap: str = "",
        wait: float = 20,
        limits: dict[str, str] | None = None,
        workers: int = 1,
        cores: int | str = 0,
        settings: dict[str, str] | None = None,
    ) -> Server:
        """The Procfile's own command (``root``'s Procfile, run from ``root`` with it first on the import
        path), pinned to ``cores`` with ``workers`` as ``WEB_CONCURRENCY``; its log goes to a file as a
        PaaS collects stdout. ``wrap`` is a command prefix (valgrind) for the process the line finally
        ``exec``s. With ``limits`` (extra settings), the bench team gets a budget and a requests-per-minute
        limit before its key is made. ``settings`` are extra settings of any other kind."""
        port = free_port()
        procfile = (root / "Procfile").read_text().split("web:", 1)[1].strip()
        if wrap:
            head, found, tail = procfile.rpartition("exec ")
            procfile = f"{head}exec {wrap} {tail}" if found else f"{wrap} {procfile}"
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            "PORT": str(port),
            "WEB_CONCURRENCY": str(workers),
            "AI_GATEWAY_URL": upstream,
            "AI_GATEWAY_TOKEN": "bench-gateway-token",
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": database_url,
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "info"),
            **(limits or {}),
            **(settings or {}),
        }
        process = self.spawn(f"sh -c {_quote(procfile)}", cores, env, log=name, cwd=root)
        wait_port(port, wait)
        base = f"http://127.0.0.1:{port}"
        if limits is not None:
            _set_limits(base, wait)
        return Server(name, f"{base}/openai/v1/chat/completions", base, process, key=_create_key(base, wait))

    def worker_gateways(self, upstream: str) -> list[Server]:
        """The gateway from its Procfile with ``WEB_CONCURRENCY=2``, once per ``WORKER_ROWS`` entry."""
        return [
            self.gateway(name, upstream, f"sqlite:///{self.work}/{name}.db", self.gateway_root, workers=2, cores=cores)
            for name, cores in WORKER_ROWS.items()
        ]

    # -- measurements -------------------------------------------------------------------------

    def wrk(
        self, url: str, connections: int, duration: float, key: str = "none", misses: bool = False
    ) -> dict[str, float]:
        """One wrk run; with ``misses`` every request carries a new random key (all 401s)."""
        script = self.work / "post.lua"
        script.write_text((MISS_SCRIPT if misses else WRK_SCRIPT) % (REQUEST_BODY, key))
        out = subprocess.run(
            [
                "taskset",
                "-c",
                str(CLIENT_CORE),
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
        requests, duration_us, p50, p99, errors, non2xx = (int(x) for x in line.split()[1:])
        if errors or (non2xx and not misses):
            raise RuntimeError(f"{url}: {errors} socket errors, {non2xx} non-2xx responses")
        return {
            "requests": requests,
            "rps": requests / (duration_us / 1e6),
            "p50_ms": p50 / 1000,
            "p99_ms": p99 / 1000,
        }

    def load_round(self, server: Server) -> None:
        self.wrk(server.url, 1, 1, server.key)  # warm connections and caches
        one = self.wrk(server.url, 1, self.duration, server.key)
        server.add("p50_1c_ms", one["p50_ms"])
        server.add("p99_1c_ms", one["p99_ms"])
        cpu_before = cpu_seconds(server.process.pid)
        many = self.wrk(server.url, 32, self.duration, server.key)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        server.add("rps_32c", many["rps"])
        server.add("p99_32c_ms", many["p99_ms"])
        server.add("cpu_us_per_req", cpu / many["requests"] * 1e6)
        server.add("rss_load_mib", rss_mib(server.process.pid))

    def miss_round(self, server: Server) -> None:
        """Every request with a never-seen key: each one is a store query (then a 401)."""
        one = self.wrk(server.url, 1, self.duration, misses=True)
        server.add("miss_p50_1c_ms", one["p50_ms"])
        cpu_before = cpu_seconds(server.process.pid)
        many = self.wrk(server.url, 32, self.duration, misses=True)
        server.add("miss_cpu_us_per_req", (cpu_seconds(server.process.pid) - cpu_before) / many["requests"] * 1e6)

    async def sse_times(self, server: Server, path: str, count: int) -> tuple[list[float], list[float]]:
        firsts, lasts = [], []
        base = server.base
        headers = {"Authorization": f"Bearer {server.key}"}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for _ in range(count):
                start = time.perf_counter()
                first = None
                async with session.get(base + path, headers=headers) as response:
                    async for _chunk in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                lasts.append((time.perf_counter() - start) * 1000)
                firsts.append(((first or time.perf_counter()) - start) * 1000)
        return firsts, lasts

    async def slow_streams(self, server: Server, count: int) -> float:
        headers = {"Authorization": f"Bearer {server.key}"}
        before = rss_mib(server.process.pid)
        peak = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(server.process.pid))
                await asyncio.sleep(0.05)

        async def one(session: aiohttp.ClientSession) -> None:
            async with session.get(f"{server.base}/openai/_mock/sse?n=40&interval=0.05", headers=headers) as r:
                async for _chunk in r.content.iter_any():
                    pass

        sampler = asyncio.create_task(sample())
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            await asyncio.gather(*(one(session) for _ in range(count)))
        done.set()
        await sampler
        return peak - before

    async def idle_connections(self, server: Server, count: int) -> dict[str, Any]:
        """``count`` client connections, each after one proxied request, held idle with keep-alive: the
        server's RSS growth per connection, its CPU while idle (the ledger's last batch written first),
        and the latency of wrk's sequential requests (one connection) before, while they are held and
        after they are closed. All within the gateway's 75 s keep-alive (``still_open`` checks)."""
        pid = server.process.pid
        host, port = server.base.rsplit("//", 1)[1].rsplit(":", 1)
        body = REQUEST_BODY.encode()
        request = (
            f"POST /{server.url.split('/', 3)[3]} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        gate = asyncio.Semaphore(32)  # as many at once as wrk's load: the upstream pool is that size already

        async def connect() -> None:
            async with gate:
                reader, writer = await asyncio.open_connection(host, int(port))
                held.append((reader, writer))
                writer.write(request)
                if (status := await read_response(reader)) != 200:
                    raise RuntimeError(f"{server.name}: {status} on an idle client's request")

        async def latency() -> dict[str, float]:
            return await asyncio.to_thread(self.wrk, server.url, 1, self.duration, server.key)

        async def idle_cpu_ms_per_s(seconds: float = 4.0) -> float:
            before = cpu_ns(pid)
            await asyncio.sleep(seconds)
            return (cpu_ns(pid) - before) / seconds / 1e6

        await asyncio.to_thread(self.wrk, server.url, 32, 1, server.key)
        out: dict[str, Any] = {"connections": count, "open_files_limit": open_files_limit(pid)}
        out["without"] = await latency()
        await asyncio.sleep(SETTLE_SECONDS)
        out["idle_cpu_ms_per_s_without"] = await idle_cpu_ms_per_s()
        rss_before = rss_mib(pid)
        started = time.monotonic()
        try:
            await asyncio.gather(*(connect() for _ in range(count)))
            out["open_seconds"] = time.monotonic() - started
            await asyncio.sleep(SETTLE_SECONDS)
            out["rss_before_mib"], out["rss_held_mib"] = rss_before, rss_mib(pid)
            out["rss_kib_per_connection"] = (out["rss_held_mib"] - rss_before) * 1024 / count
            out["idle_cpu_ms_per_s_held"] = await idle_cpu_ms_per_s()
            out["held"] = await latency()
            out["still_open"] = sum(not reader.at_eof() for reader, _ in held)
        finally:
            for _, writer in held:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for _, writer in held), return_exceptions=True)
        await asyncio.sleep(SETTLE_SECONDS)
        out["after"] = await latency()
        out["rss_after_mib"] = rss_mib(pid)
        return out

    async def many_streams(self, server: Server, direct: Server, count: int) -> dict[str, Any]:
        """``count`` streams (an event a second) opened at once through the server: each one's time to its
        first event, the server's RSS growth, and the first event of 50 new streams (one after another)
        before and while they are open, through the server and straight to the upstream, in alternating
        blocks of 10 (the added time, as in the SSE row)."""
        pid = server.process.pid
        headers = {"Authorization": f"Bearer {server.key}"}
        firsts: list[float] = []

        async def first_events() -> dict[str, float]:
            times: dict[str, list[float]] = {"server_ms": [], "direct_ms": []}
            for _ in range(5):  # alternated, so that a change in the machine's load hits both alike
                for figure, target in (("server_ms", server), ("direct_ms", direct)):
                    times[figure] += (await self.sse_times(target, "/openai/_mock/sse?n=1", 10))[0]
            figures = {figure: statistics.median(values) for figure, values in times.items()}
            return {**figures, "added_ms": figures["server_ms"] - figures["direct_ms"]}

        async def one(session: aiohttp.ClientSession) -> None:
            start: float | None = time.perf_counter()
            async with session.get(f"{server.base}/openai/_mock/sse?n=300&interval=1", headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{server.name}: {r.status} on one of {count} streams")
                async for _chunk in r.content.iter_any():
                    if start is not None:
                        firsts.append((time.perf_counter() - start) * 1000)
                        start = None

        out: dict[str, Any] = {"streams": count, "open_files_limit": open_files_limit(pid)}
        await asyncio.sleep(SETTLE_SECONDS)
        out["without"] = await first_events()
        rss_before = rss_mib(pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            tasks = [asyncio.create_task(one(session)) for _ in range(count)]
            try:
                while len(firsts) < count:
                    if failed := [t for t in tasks if t.done()]:
                        failed[0].result()
                        raise RuntimeError(f"{server.name}: a stream ended before the others started")
                    await asyncio.sleep(0.05)
                ordered = sorted(firsts)
                out["burst_first_event_ms"] = {
                    "p50": statistics.median(ordered),
                    "p99": ordered[int(len(ordered) * 0.99) - 1],
                    "max": ordered[-1],
                }
                out["rss_kib_per_stream"] = (rss_mib(pid) - rss_before) * 1024 / count
                out["held"] = await first_events()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return out

    def big_response(self, server: Server) -> float:
        before = rss_mib(server.process.pid)
        curl = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(CLIENT_CORE),
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-H",
                f"Authorization: Bearer {server.key}",
                server.base + self.big_path,
            ]
        )
        peak = before
        while curl.poll() is None:
            peak = max(peak, rss_mib(server.process.pid))
            time.sleep(0.02)
        if curl.returncode:
            raise RuntimeError(f"{server.name}: relaying 1 GiB failed")
        return peak - before

    def run(self) -> dict[str, Any]:
        direct, proxies = self.start()
        if self.workers:  # measured right after the one-worker gateway in every round
            after_gateway = next(i for i, p in enumerate(proxies) if p.name == "gateway") + 1
            proxies[after_gateway:after_gateway] = self.worker_gateways(direct.base)
        everyone = [direct, *proxies]
        for server in everyone:
            server.add("rss_idle_mib", rss_mib(server.process.pid))
        for number in range(self.rounds):
            print(f"round {number + 1}/{self.rounds}", file=sys.stderr, flush=True)
            for server in everyone if number % 2 == 0 else everyone[::-1]:
                self.load_round(server)
        several = [s for s in proxies if s.name in WORKER_ROWS]
        for server in several:
            server.add("busiest_worker_cpu_share", busiest_worker_share(server.process.pid))
        self.stop([s.process for s in several])  # their timers would share core 0 with the next steps
        streamed = [s for s in everyone if not s.name.startswith("limits") and s.name not in WORKER_ROWS]
        for _ in range(self.rounds):
            for server in streamed:
                firsts, lasts = asyncio.run(self.sse_times(server, "/openai/_mock/sse?n=100", SSE_STREAMS))
                server.add("sse_first_ms", statistics.median(firsts))
                server.add("sse_last_ms", statistics.median(lasts))
        gateways = [p for p in proxies if p.name.startswith("gateway")]
        for number in range(self.rounds):
            for server in gateways if number % 2 == 0 else gateways[::-1]:
                self.miss_round(server)
        for server in streamed[1:]:
            server.add("rss_1gib_growth_mib", self.big_response(server))
            server.add("rss_100_streams_growth_mib", asyncio.run(self.slow_streams(server, 100)))
        many: dict[str, Any] = {}
        for server in (p for p in proxies if p.name in ("bare", "gateway")):  # the bare relay as the reference
            if self.idle_clients:
                print(f"{server.name}: {self.idle_clients} idle connections", file=sys.stderr, flush=True)
                idle = asyncio.run(self.idle_connections(server, self.idle_clients))
                many.setdefault("idle_connections", {})[server.name] = idle
            if self.streams:
                print(f"{server.name}: {self.streams} concurrent streams", file=sys.stderr, flush=True)
                many.setdefault("streams", {})[server.name] = asyncio.run(
                    self.many_streams(server, direct, self.streams)
                )
        result = report(direct, proxies)
        if many:
            result["many_clients"] = many
        if self.callgrind is not None:
            from bench import instructions

            print("instructions per request (callgrind)", file=sys.stderr, flush=True)
            self.stop(
                [p.process for p in proxies]
            )  # idle, but their timers would share core 0 with the counted servers
            counted = {"gateway": self.gateway_root}
            if self.baseline_root is not None:
                counted["gateway-base"] = self.baseline_root
            result["instructions"] = instructions.run(
                self, direct.base, *self.callgrind, counted, limits=self.callgrind_limits
            )
        return result


def _postgres_schema() -> str | None:
    """A DSN on a fresh schema of this machine's PostgreSQL, or ``None`` when it is not reachable."""
    import asyncpg

    root = os.environ.get("BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
    schema = "bench_" + os.urandom(4).hex()

    async def create() -> None:
        connection = await asyncpg.connect(root, timeout=3)
        try:
            await connection.execute(f"CREATE SCHEMA {schema}")
        finally:
            await connection.close()

    try:
        asyncio.run(create())
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    return f"{root}?search_path={schema}"


def limits_contenders() -> dict[str, dict[str, str]]:
    """The limits rows and their extra settings: ``limits-mem`` (the process's memory) and
    ``limits-redis`` (this machine's Redis, a key prefix of its own per run), when Redis answers."""
    contenders: dict[str, dict[str, str]] = {"limits-mem": {}}
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_reachable(redis_url):
        prefix = f"bench-{os.urandom(4).hex()}:"
        contenders["limits-redis"] = {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix}
    else:
        print(f"Redis is not reachable at {redis_url}: the limits-redis row is left out", file=sys.stderr)
    return contenders


def _redis_reachable(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _set_limits(base: str, timeout: float = 20) -> None:
    """The bench team under a budget and a requests-per-minute limit it never reaches: every request
    is checked, reserved, released and settled."""
    import urllib.request

    limits = {"requestsPerMinute": 1_000_000_000, "budgetUsd": 1_000_000_000, "budgetPeriod": "month"}
    request = urllib.request.Request(
        f"{base}/teams/team_bench",
        data=json.dumps({"limits": limits}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        method="PATCH",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _create_key(base: str, timeout: float = 20, fields: dict[str, object] | None = None) -> str:
    """A team key made through the token API (``fields``: its allow-lists or expiry, say)."""
    import urllib.request

    request = urllib.request.Request(
        f"{base}/tokens",
        data=json.dumps({"teamId": "team_bench", "name": "Bench", **(fields or {})}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        key: str = json.load(response)["apiKey"]
        return key


def report(direct: Server, proxies: list[Server]) -> dict[str, Any]:
    servers = {s.name: s for s in (direct, *proxies)}
    out: dict[str, Any] = {
        "servers": {name: {m: s.median(m) for m in s.results} for name, s in servers.items()},
        "raw": {name: s.results for name, s in servers.items()},
    }
    base = out["servers"]
    for name in (p.name for p in proxies):
        row = base[name]
        row["added_p50_1c_ms"] = row["p50_1c_ms"] - base["direct"]["p50_1c_ms"]
        row["added_p99_1c_ms"] = row["p99_1c_ms"] - base["direct"]["p99_1c_ms"]
        if row.get("sse_first_ms") is not None:
            row["added_sse_first_ms"] = row["sse_first_ms"] - base["direct"]["sse_first_ms"]
            row["added_sse_last_ms"] = row["sse_last_ms"] - base["direct"]["sse_last_ms"]
    gw, bare = base["gateway"], base["bare"]
    out["ratios_gateway_vs_bare"] = {
        "cpu_per_request": gw["cpu_us_per_req"] / bare["cpu_us_per_req"],
        "rps_32c": gw["rps_32c"] / bare["rps_32c"],
        "p99_32c": gw["p99_32c_ms"] / bare["p99_32c_ms"],
    }
    if "gateway-base" in base:
        old = base["gateway-base"]
        out["ratios_gateway_base_vs_bare"] = {
            "cpu_per_request": old["cpu_us_per_req"] / bare["cpu_us_per_req"],
            "rps_32c": old["rps_32c"] / bare["rps_32c"],
            "p99_32c": old["p99_32c_ms"] / bare["p99_32c_ms"],
        }
        out["ratio_gateway_vs_base_cpu_per_request"] = gw["cpu_us_per_req"] / old["cpu_us_per_req"]
    out["limits_vs_gateway"] = {
        name: {
            "cpu_per_request": base[name]["cpu_us_per_req"] / gw["cpu_us_per_req"],
            "added_p50_ms": base[name]["p50_1c_ms"] - gw["p50_1c_ms"],
        }
        for name in ("limits-mem", "limits-redis")
        if name in base
    }
    if "metering-off" in base:
        off = base["metering-off"]
        out["metering_vs_off"] = {
            "cpu_per_request": gw["cpu_us_per_req"] / off["cpu_us_per_req"],
            "added_p50_ms": gw["p50_1c_ms"] - off["p50_1c_ms"],
            "added_sse_first_ms": gw["sse_first_ms"] - off["sse_first_ms"],
        }
    out["workers_vs_gateway"] = {
        name: {
            "cpu_per_request": base[name]["cpu_us_per_req"] / gw["cpu_us_per_req"],
            "cpu_per_request_by_round": [
                two / one
                for two, one in zip(
                    servers[name].results["cpu_us_per_req"], servers["gateway"].results["cpu_us_per_req"], strict=True
                )
            ],
            "rps_32c": base[name]["rps_32c"] / gw["rps_32c"],
            "added_p50_ms": base[name]["p50_1c_ms"] - gw["p50_1c_ms"],
        }
        for name in WORKER_ROWS
        if name in base
    }
    if "gateway-pg" in base:
        out["ratio_postgres_vs_sqlite_cpu_per_request"] = base["gateway-pg"]["cpu_us_per_req"] / gw["cpu_us_per_req"]
    return out


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("added p50 @1 conn (ms)", "added_p50_1c_ms"),
        ("added p99 @1 conn (ms)", "added_p99_1c_ms"),
        ("req/s @32 conn", "rps_32c"),
        ("p99 @32 conn (ms)", "p99_32c_ms"),
        ("CPU per request (µs)", "cpu_us_per_req"),
        ("SSE first event added (ms)", "added_sse_first_ms"),
        ("SSE last event added (ms)", "added_sse_last_ms"),
        ("RSS idle (MiB)", "rss_idle_mib"),
        ("RSS under load (MiB)", "rss_load_mib"),
        ("RSS growth, 1 GiB body (MiB)", "rss_1gib_growth_mib"),
        ("RSS growth, 100 streams (MiB)", "rss_100_streams_growth_mib"),
        ("cache miss p50 @1 conn (ms)", "miss_p50_1c_ms"),
        ("cache miss CPU per request (µs)", "miss_cpu_us_per_req"),
        ("busiest worker's CPU share", "busiest_worker_cpu_share"),
    ]
    servers = result["servers"]
    names = list(servers)
    counted = result.get("instructions")
    if counted is not None:
        for name in servers:
            if name in counted:
                servers[name]["k_instructions_per_req"] = counted[name]["instructions_per_request"] / 1000
        rows.insert(5, ("instructions per request (k)", "k_instructions_per_req"))
    print(f"{'':34}" + "".join(f"{n:>14}" for n in names))
    for label, key in rows:
        cells = []
        for name in names:
            value = servers[name].get(key)
            cells.append(f"{value:>14.2f}" if isinstance(value, float | int) else f"{'—':>14}")
        print(f"{label:34}" + "".join(cells))
    ratios = result["ratios_gateway_vs_bare"]
    print(
        f"\ngateway ÷ bare relay: CPU/request {ratios['cpu_per_request']:.3f}, "
        f"req/s {ratios['rps_32c']:.3f}, p99@32 {ratios['p99_32c']:.3f}"
    )
    if "ratios_gateway_base_vs_bare" in result:
        ratios = result["ratios_gateway_base_vs_bare"]
        print(
            f"gateway-base ÷ bare relay: CPU/request {ratios['cpu_per_request']:.3f}, "
            f"req/s {ratios['rps_32c']:.3f}, p99@32 {ratios['p99_32c']:.3f}; "
            f"gateway ÷ gateway-base, CPU/request {result['ratio_gateway_vs_base_cpu_per_request']:.3f}"
        )
    for name, figures in result.get("limits_vs_gateway", {}).items():
        print(
            f"{name} ÷ gateway (budget + RPM on the team): CPU/request {figures['cpu_per_request']:.3f}, "
            f"p50 @1 conn {figures['added_p50_ms'] * 1000:+.0f} µs"
        )
    if "metering_vs_off" in result:
        figures = result["metering_vs_off"]
        print(
            f"gateway ÷ metering-off (USAGE_METERING=false): CPU/request {figures['cpu_per_request']:.3f} "
            f"(target ≤ 1.05), p50 @1 conn {figures['added_p50_ms'] * 1000:+.0f} µs, "
            f"SSE first event {figures['added_sse_first_ms'] * 1000:+.0f} µs"
        )
    if counted is not None:
        from bench.instructions import print_figures

        print_figures(counted)
    if "ratio_postgres_vs_sqlite_cpu_per_request" in result:
        print(
            f"gateway on PostgreSQL ÷ on SQLite, CPU/request (cache hits): "
            f"{result['ratio_postgres_vs_sqlite_cpu_per_request']:.3f}"
        )
    print_workers_and_many_clients(result)


def print_workers_and_many_clients(result: dict[str, Any]) -> None:
    for name, figures in result.get("workers_vs_gateway", {}).items():
        rounds = ", ".join(f"{ratio:.3f}" for ratio in figures["cpu_per_request_by_round"])
        print(
            f"{name} ÷ gateway (cores {WORKER_ROWS[name]}): CPU/request {figures['cpu_per_request']:.3f} "
            f"(by round {rounds}; target ≤ 1.05), req/s @32 {figures['rps_32c']:.3f}, "
            f"p50 @1 conn {figures['added_p50_ms'] * 1000:+.0f} µs"
        )
    many = result.get("many_clients", {})
    for name, idle in many.get("idle_connections", {}).items():
        print(
            f"{name}: {idle['connections']} idle keep-alive connections ({idle['still_open']} still open at the "
            f"end, opened in {idle['open_seconds']:.1f} s): RSS {idle['rss_before_mib']:.1f} → "
            f"{idle['rss_held_mib']:.1f} MiB, {idle['rss_kib_per_connection']:.2f} KiB per connection "
            f"(target ≤ 8); idle CPU {idle['idle_cpu_ms_per_s_without']:.1f} → "
            f"{idle['idle_cpu_ms_per_s_held']:.1f} ms/s"
        )
        print(
            "  p50 / p99 @1 conn (ms): "
            + ", ".join(
                f"{when} {idle[when]['p50_ms']:.3f} / {idle[when]['p99_ms']:.3f}"
                for when in ("without", "held", "after")
            )
        )
    for name, streams in many.get("streams", {}).items():
        burst = streams["burst_first_event_ms"]
        print(
            f"{name}: {streams['streams']} concurrent streams opened at once: first event p50 {burst['p50']:.1f} ms, "
            f"p99 {burst['p99']:.1f} ms, max {burst['max']:.1f} ms; RSS {streams['rss_kib_per_stream']:.1f} KiB "
            f"per stream"
        )
        print(
            "  a new stream's first event, added to direct (ms): "
            + ", ".join(f"{when} {streams[when]['added_ms']:+.3f}" for when in ("without", "held"))
            + " (target ≤ 0.3)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-nginx", action="store_true", help="use the in-process mock as the upstream")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--gateway-root",
        type=Path,
        default=ROOT,
        help="the source tree the gateway runs from (its Procfile, first on the import path): an older "
        "checkout, to measure it with this harness; the bare relay and the rest stay this tree's",
    )
    parser.add_argument(
        "--baseline-root",
        type=Path,
        default=None,
        help="another tree (e.g. `git worktree add /tmp/bench-base COMMIT`) whose gateway runs beside this one "
        "as gateway-base, in the same interleaved rounds and the same instructions step",
    )
    parser.add_argument("--no-instructions", action="store_true", help="skip the callgrind step")
    parser.add_argument("--no-workers", action="store_true", help="leave out the two-worker gateways (WORKER_ROWS)")
    parser.add_argument(
        "--idle-clients", type=int, default=2000, help="idle keep-alive connections held on the gateway (0: skip)"
    )
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams held on the gateway (0: skip)")
    from bench import instructions

    instructions.add_arguments(parser)
    args = parser.parse_args()
    raise_open_files_limit()  # inherited by the servers it starts; the idle connections need it in this process
    pin_harness()
    for tool in ("wrk", "taskset", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench needs {tool}: run `make bench` (it installs wrk and nginx from Debian's packages)")
    count_instructions = not args.no_instructions
    if count_instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is not installed: the instructions row is left out", file=sys.stderr)
        count_instructions = False
    use_nginx = shutil.which("nginx") is not None and not args.no_nginx
    if not use_nginx:
        print(
            "nginx is not installed: the upstream is the in-process mock and the nginx row is left out",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as work:
        baseline = args.baseline_root.resolve() if args.baseline_root else None
        bench = Bench(Path(work), args.duration, args.rounds, use_nginx, args.gateway_root.resolve(), baseline)
        if count_instructions:
            bench.callgrind = (args.cg_warmup, args.cg_requests, args.cg_idle)
            bench.callgrind_limits = args.cg_limits
        bench.workers, bench.idle_clients, bench.streams = not args.no_workers, args.idle_clients, args.streams
        try:
            result = bench.run()
        finally:
            bench.stop_all()
    result["upstream"] = "nginx" if use_nginx else "python mock"
    result["machine"] = {
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": args.duration,
        "rounds": args.rounds,
    }
    result["gateway_root"] = str(args.gateway_root.resolve())
    if baseline is not None:
        result["baseline_root"] = str(baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
