"""``make bench``: what the gateway adds to a call, as ratios against references measured in the same run.

Contenders, each pinned with ``taskset`` to core 0 (the load generator and the upstream get core 1):

- ``direct``: wrk straight at the upstream (nginx serving a static completion);
- ``nginx``: nginx as a plain reverse proxy, the floor for any proxy;
- ``bare``: bench/bare_relay.py, uvicorn + raw ASGI + one aiohttp session, the floor of this stack;
- ``gateway``: the real Procfile command, one worker, with a real team key;
- ``limits-mem`` and ``limits-redis``: the same gateway, its team under a budget and a requests-per-minute
  limit (never reached), kept in memory and in this machine's Redis (``REDIS_URL``): what limits cost on
  the proxied path (load rounds only).

Rounds are interleaved (every contender once per round, several rounds) and medians reported, since
this shared 2-core machine is noisy. Figures: added latency at 1 connection, req/s and p99 at 32
connections, CPU time per request (utime+stime of the server's processes ÷ requests), added time to the
first and last event of a 100-event SSE stream, and RSS idle, under load, relaying 1 GiB and holding
100 slow streams.
"""

from __future__ import annotations

import argparse
import asyncio
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
        self.callgrind_limits = False
        """Whether the instructions step counts the limits rows too."""

    def spawn(
        self,
        command: list[str] | str,
        core: int,
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
        ]
        process = self.spawn(command, 0, {**os.environ, "UPSTREAM_URL": upstream}, log=name)
        wait_port(port, wait)
        base = f"http://127.0.0.1:{port}"
        return Server(name, f"{base}/openai/chat/completions", base, process)

    def _python_proxies(self, upstream: str) -> list[Server]:
        servers = [
            self.bare(upstream),
            self.gateway("gateway", upstream, f"sqlite:///{self.work}/gateway.db", self.gateway_root),
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
    ) -> Server:
        """The Procfile's own command (``root``'s Procfile, run from ``root`` with it first on the import
        path), pinned; its log goes to a file as a PaaS collects stdout. ``wrap`` is a command prefix
        (valgrind) for the process the line finally ``exec``s. With ``limits`` (extra settings), the
        bench team gets a budget and a requests-per-minute limit before its key is made."""
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
            "WEB_CONCURRENCY": "1",
            "AI_GATEWAY_URL": upstream,
            "AI_GATEWAY_TOKEN": "bench-gateway-token",
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": database_url,
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "info"),
            **(limits or {}),
        }
        process = self.spawn(f"sh -c {_quote(procfile)}", 0, env, log=name, cwd=root)
        wait_port(port, wait)
        base = f"http://127.0.0.1:{port}"
        if limits is not None:
            _set_limits(base, wait)
        return Server(name, f"{base}/openai/v1/chat/completions", base, process, key=_create_key(base, wait))

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
                "1",
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

    def big_response(self, server: Server) -> float:
        before = rss_mib(server.process.pid)
        curl = subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
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
        everyone = [direct, *proxies]
        for server in everyone:
            server.add("rss_idle_mib", rss_mib(server.process.pid))
        for number in range(self.rounds):
            print(f"round {number + 1}/{self.rounds}", file=sys.stderr, flush=True)
            for server in everyone if number % 2 == 0 else everyone[::-1]:
                self.load_round(server)
        streamed = [s for s in everyone if not s.name.startswith("limits")]
        for _ in range(self.rounds):
            for server in streamed:
                firsts, lasts = asyncio.run(self.sse_times(server, "/openai/_mock/sse?n=100", 15))
                server.add("sse_first_ms", statistics.median(firsts))
                server.add("sse_last_ms", statistics.median(lasts))
        gateways = [p for p in proxies if p.name.startswith("gateway")]
        for number in range(self.rounds):
            for server in gateways if number % 2 == 0 else gateways[::-1]:
                self.miss_round(server)
        for server in streamed[1:]:
            server.add("rss_1gib_growth_mib", self.big_response(server))
            server.add("rss_100_streams_growth_mib", asyncio.run(self.slow_streams(server, 100)))
        result = report(direct, proxies)
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
    if counted is not None:
        from bench.instructions import print_figures

        print_figures(counted)
    if "ratio_postgres_vs_sqlite_cpu_per_request" in result:
        print(
            f"gateway on PostgreSQL ÷ on SQLite, CPU/request (cache hits): "
            f"{result['ratio_postgres_vs_sqlite_cpu_per_request']:.3f}"
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
    from bench import instructions

    instructions.add_arguments(parser)
    args = parser.parse_args()
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
