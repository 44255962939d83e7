"""Shared fixtures: a real mock Cloudflare AI Gateway and real gateway processes (``tests/support.py``
has the helpers behind them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.mock_upstream import MockUpstream
from tests.postgres import pg_dsn, pg_proxy  # noqa: F401 (fixtures for every test module)
from tests.redis_server import private_redis, redis_prefix  # noqa: F401 (fixtures for every test module)
from tests.support import GATEWAY_TOKEN, GatewayProcess, gateway_env, start_gateway


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
    """Start a gateway with its own settings (``""`` removes a variable) for one test."""
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
