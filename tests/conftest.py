"""Shared fixtures: a real mock Cloudflare AI Gateway and real gateway processes.

The gateway runs as a subprocess of the Procfile's runner (``python -m service.server``: its uvicorn
options, protocol class and limits) on a free port,
its JSON log captured to a file so tests can read what it printed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.postgres import pg_dsn, pg_proxy  # noqa: F401 (fixtures for every test module)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_KEY = "admin-secret-0123456789abcdef"
GATEWAY_TOKEN = "cf-gateway-token-fedcba9876543210"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    admin_key: str | None = ADMIN_KEY
    keys: list[str] = field(default_factory=list)

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            if raw.strip():
                lines.append(orjson.loads(raw))
        return lines

    def log_text(self) -> str:
        return self.log_path.read_text()

    def access_line(self, request_id: str, timeout: float = 5.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("event") == "request" and line.get("request_id") == request_id:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no access line for {request_id}")

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
    "PRICES_FILE",
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
    "USAGE_RETENTION_DAYS",
)


def is_gateway_setting(name: str) -> bool:
    """Settings a developer's shell may carry that must not leak into the gateways under test."""
    return name in SETTINGS or name.startswith("AI_GATEWAY") or name.endswith(("_API_KEY", "_BASE_URL"))


def gateway_env(upstream_url: str | None, tmp: Path, **overrides: str) -> dict[str, str]:
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


def start_gateway(env: dict[str, str], tmp: Path, *, workers: int = 1, port: int | None = None) -> GatewayProcess:
    port = port or free_port()
    log_path = tmp / f"gateway-{port}.log"
    # the Procfile's runner: the same protocol class, limits and uvicorn options as production
    command = [str(BIN / "python"), "-m", "service.server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log_path, env, env.get("ADMIN_API_KEY"))
    wait_healthy(gateway)
    return gateway


def wait_healthy(gateway: GatewayProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{gateway.log_text()}")
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    gateway.stop()
    raise AssertionError(f"gateway did not become healthy:\n{gateway.log_text()}")


@pytest.fixture(scope="session")
def upstream() -> MockUpstream:
    mock = MockUpstream(token=GATEWAY_TOKEN)
    mock.start_in_thread()
    return mock


@pytest.fixture(scope="session")
def gateway(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("gateway")
    process = start_gateway(gateway_env(upstream.url, tmp), tmp)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def team_key(gateway: GatewayProcess) -> str:
    return gateway.create_key("team_123", "Acme Corp")


@pytest.fixture
def make_gateway(upstream: MockUpstream, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway with its own settings (``None`` removes a variable) for one test."""
    started: list[GatewayProcess] = []

    def make(*, workers: int = 1, upstream_url: str | None = "default", **overrides: str) -> GatewayProcess:
        url = upstream.url if upstream_url == "default" else upstream_url
        process = start_gateway(gateway_env(url, tmp_path, **overrides), tmp_path, workers=workers)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def direct_upstream() -> MockUpstream:
    """A second mock standing in for providers' own APIs (no Cloudflare token required)."""
    mock = MockUpstream()
    mock.start_in_thread()
    return mock
