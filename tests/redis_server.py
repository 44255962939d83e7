"""The real Redis of this machine (127.0.0.1:6379) with a key prefix of its own per test, and
private ``redis-server`` processes a test may stop and start again (never the machine's own).

Locally a missing Redis skips these tests; in CI (``CI`` set) it fails them: `.ci/run` starts the
server, so unreachable there is a real failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import free_port, port_open, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_reachable(url: str = REDIS_URL) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def require_redis() -> None:
    if redis_reachable():
        return
    message = f"Redis is not reachable at {REDIS_URL}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI starts it in .ci/run; this is a real failure)")
    pytest.skip(message)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix for one test on the shared Redis; its keys are deleted afterwards."""
    require_redis()
    prefix = f"test-{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, without persistence: ``stop()`` loses
    everything, as a Redis restarted without a disk would; ``start()`` serves the same port again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen([*command, "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        wait_until(lambda: not port_open(self.port), 10, f"redis-server on port {self.port} gone")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
