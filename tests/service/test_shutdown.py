"""SIGTERM as a PaaS deploy sends it: no new requests, in-flight streams finish within the grace."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.mock_upstream import MockUpstream
from tests.config.test_settings import procfile_command
from tests.conftest import ADMIN_KEY, BIN, GatewayProcess, free_port, gateway_env, wait_healthy


def start(tmp_path: Path, upstream: MockUpstream, grace: str) -> GatewayProcess:
    port = free_port()
    env = {
        **gateway_env(upstream.url, tmp_path),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PORT": str(port),
        "SHUTDOWN_GRACE_SECONDS": grace,
    }
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", "-c", procfile_command()], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log_path, env, ADMIN_KEY)
    wait_healthy(gateway)
    return gateway


@pytest.mark.parametrize(("grace", "completes"), [("10", True), ("1", False)])
def test_sigterm_lets_streams_finish_within_the_grace(
    tmp_path: Path, upstream: MockUpstream, grace: str, completes: bool
) -> None:
    gw = start(tmp_path, upstream, grace)
    key = gw.create_key()
    events = 0
    with httpx.stream(
        "GET", f"{gw.url}/openai/_mock/sse?n=20&interval=0.15", headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        gw.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutdown started
            httpx.get(f"{gw.url}/healthz", timeout=2)
        try:
            events = 1 + sum(1 for line in lines if line.startswith("data:"))
        except httpx.RemoteProtocolError:
            assert not completes
    assert gw.process.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    if completes:
        assert events == 21  # every event, then [DONE]
    else:
        assert events < 21
    log = gw.log_text()
    assert '"event":"gateway_stopped"' in log and "Traceback" not in log
