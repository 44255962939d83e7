"""What the tests share: constants, free ports, polling with a deadline instead of fixed sleeps,
gateway processes started the Procfile's way, and requests over raw sockets.

The gateway runs as a subprocess of the Procfile's runner (``python -m service.server``: its uvicorn
options, protocol class and limits) on a free port, its JSON log captured to a file so tests can
read what it printed. Fixtures built on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_KEY = "admin-secret-0123456789abcdef"
GATEWAY_TOKEN = "cf-gateway-token-fedcba9876543210"


# -- ports and polling ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


async def eventually(
    condition: Callable[[], Awaitable[object] | object], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """``wait_until`` inside an event loop: ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    wait_until(lambda: port_open(port), timeout, f"a server listening on port {port}")


def answers(url: str, status: int = 200) -> bool:
    """Whether a GET of ``url`` answers ``status`` now (a refused or failed connection is ``False``)."""
    try:
        return httpx.get(url, timeout=2).status_code == status
    except httpx.HTTPError:
        return False


def procfile_command() -> str:
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    return line.removeprefix("web:").strip()


# -- gateway processes ------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    admin_key: str | None = ADMIN_KEY
    keys: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            if raw.strip():
                lines.append(orjson.loads(raw))
        return lines

    def log_text(self) -> str:
        return self.log_path.read_text()

    def access_line(self, request_id: str, timeout: float = 5.0) -> dict[str, object]:
        found: list[dict[str, object]] = []

        def logged() -> bool:
            found.extend(
                line
                for line in self.log_lines()
                if line.get("event") == "request"
                and request_id in (line.get("request_id"), line.get("client_request_id"))
            )
            return bool(found)

        wait_until(logged, timeout, f"the access line of {request_id}")
        return found[0]

    def create_key(self, team_id: str = "team_123", name: str | None = "Acme Corp") -> str:
        body: dict[str, str] = {"teamId": team_id}
        if name is not None:
            body["name"] = name
        response = httpx.post(f"{self.url}/tokens", json=body, headers={"authorization": f"Bearer {self.admin_key}"})
        assert response.status_code == 201, response.text
        key: str = response.json()["apiKey"]
        self.keys.append(key)
        return key

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


SETTINGS = (
    "ADMIN_API_KEY",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "STORE_OUTAGE_GRACE_SECONDS",
    "LOG_LEVEL",
    "UPSTREAM_TIMEOUT_SECONDS",
    "MAX_REQUEST_BYTES",
    "PROVIDERS",
    "PROVIDERS_FILE",
    "CACHE_SCOPE",
    "METRICS_PORT",
    "METRICS_TOKEN",
    "CORS_ALLOW_ORIGINS",
    "SHUTDOWN_GRACE_SECONDS",
    "STREAM_IDLE_TIMEOUT_SECONDS",
    "CF_AIG_ALLOWED_HEADERS",
    "CF_ACCOUNT_ID",
    "WEB_CONCURRENCY",
    "PORT",
    "HOST",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LINE_BYTES",
    "HEADER_READ_TIMEOUT_SECONDS",
    "MAX_CONNECTIONS",
    "PROMETHEUS_MULTIPROC_DIR",
    "SELF_SERVICE_ROTATION",
    "UNKNOWN_KEY_LIMIT",
    "TRUSTED_PROXIES",
    "METRICS_TEAM_LABELS",
    "PRICES_FILE",
    "USAGE_METERING",
    "USAGE_STREAM_OPTIONS",
    "USAGE_RETENTION_DAYS",
    "REDIS_URL",
    "REDIS_KEY_PREFIX",
    "LIMITS_FAIL_MODE",
    "BUDGET_UNPRICED",
    "BUDGET_DEFAULT_MAX_TOKENS",
    "LIMITS_LEASE_SECONDS",
    "ADMIN_CONSOLE",
    "CONSOLE_SESSION_SECRET",
)


def is_gateway_setting(name: str) -> bool:
    """Settings a developer's shell may carry that must not leak into the gateways under test."""
    return name in SETTINGS or name.startswith("AI_GATEWAY") or name.endswith(("_API_KEY", "_BASE_URL"))


def gateway_env(upstream_url: str | None, tmp: Path, **overrides: str) -> dict[str, str]:
    """The environment of a gateway under test; an override of ``""`` removes a variable."""
    env = {k: v for k, v in os.environ.items() if not is_gateway_setting(k)}
    env.update(
        ADMIN_API_KEY=ADMIN_KEY,
        AI_GATEWAY_TOKEN=GATEWAY_TOKEN,
        AI_GATEWAY_ID="test-gateway",
        DATABASE_URL=f"sqlite:///{tmp / 'gateway.db'}",
        PYTHONUNBUFFERED="1",
    )
    if upstream_url is not None:
        env["AI_GATEWAY_URL"] = upstream_url
    env.update(overrides)
    return {k: v for k, v in env.items() if v != ""}


def with_bin_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the virtualenv's scripts first on PATH, as the Procfile's ``python`` needs."""
    return {**env, "PATH": f"{BIN}:{os.environ['PATH']}"}


def launch(
    command: Sequence[str],
    env: dict[str, str],
    tmp: Path,
    port: int,
    *,
    ready_path: str | None = "/healthz",
    new_session: bool = False,
) -> GatewayProcess:
    """Start a gateway with ``command`` (listening on ``port``), its output in a log file in ``tmp``,
    and wait until ``ready_path`` answers 200 (``None``: do not wait)."""
    log_path = tmp / f"gateway-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=tmp,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log_path, env, env.get("ADMIN_API_KEY"))
    if ready_path is not None:
        wait_healthy(gateway, ready_path)
    return gateway


def start_gateway(env: dict[str, str], tmp: Path, *, workers: int = 1, port: int | None = None) -> GatewayProcess:
    """A gateway run by the Procfile's runner: the same protocol class, limits and uvicorn options."""
    port = port or free_port()
    command = [str(BIN / "python"), "-m", "service.server", "--host", "127.0.0.1", "--port", str(port)]
    return launch([*command, "--workers", str(workers)], env, tmp, port)


def wait_healthy(gateway: GatewayProcess, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Wait until ``path`` answers 200; fail at once, with the log, if the process exits."""

    def ready() -> bool:
        if gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{gateway.log_text()}")
        return answers(gateway.url + path)

    try:
        wait_until(ready, timeout, f"{gateway.url}{path} answering 200")
    except AssertionError as failure:
        gateway.stop()
        raise AssertionError(f"{failure}\n{gateway.log_text()}") from None


# -- raw sockets ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-cased names; the last value of a repeated header."""
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def exchange(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` exactly as given on a new connection; all the server sends until it closes."""
    with connect(url, timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> RawResponse:
    """A response read off a socket: the status, the headers, the body (de-chunked if it was chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return RawResponse(int(status_line.split()[1]), headers, body)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def raw_request(
    url: str,
    method: str,
    target: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """One request whose target and headers go out byte for byte (clients normalise dot segments
    and reject odd bytes), on its own connection (``Connection: close``)."""
    host = url.removeprefix("http://").split(":")[0]
    head = [method.encode() + b" " + _bytes(target) + b" HTTP/1.1", b"host: " + host.encode(), b"connection: close"]
    head += [_bytes(name) + b": " + _bytes(value) for name, value in headers]
    head.append(b"content-length: " + str(len(body)).encode())
    return parse_response(exchange(url, b"\r\n".join(head) + b"\r\n\r\n" + body, timeout))
