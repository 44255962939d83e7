"""The Procfile's web command, run as a PaaS runs it: several workers on $PORT, each with the gateway's
HTTP protocol class and the limits of the settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from service.mock_upstream import MockUpstream
from tests.config.test_settings import procfile_command
from tests.conftest import ADMIN_KEY, BIN, GATEWAY_TOKEN, free_port


def test_procfile_serves_with_two_workers_and_revocation_reaches_every_worker(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "AI_GATEWAY_URL": upstream.url,
        "AI_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "ADMIN_API_KEY": ADMIN_KEY,
        "DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
        "MAX_HEADER_LINE_BYTES": "4096",
    }
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen(
        ["sh", "-c", procfile_command()],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=url) as client:
            first = client.post("/tokens", json={"teamId": "team_multi"}, headers=admin).json()["apiKey"]
            second = client.post("/tokens", json={"teamId": "team_multi"}, headers=admin).json()["apiKey"]

        def statuses(key: str, count: int = 40) -> set[int]:
            # a new connection per request spreads the calls over both workers
            return {
                httpx.get(f"{url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code
                for _ in range(count)
            }

        assert statuses(first) == {200} and statuses(second) == {200}  # both workers have cached them
        pids = {line for line in (tmp_path / "out.log").read_text().splitlines() if "Started server process" in line}
        assert len(pids) == 2

        assert httpx.delete(f"{url}/tokens/{first}", headers=admin).status_code == 204
        rotated = httpx.post(f"{url}/tokens/{second}/refresh").json()["apiKey"]
        time.sleep(1.0)
        assert statuses(first) == {401}
        assert statuses(second) == {401}
        assert statuses(rotated) == {200}

        # every worker speaks through the gateway's protocol class, with the limit set in the environment
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 ") and b"application/json" in answer
        assert httpx.get(f"{url}/healthz", headers={"x-big": "a" * 4000}).status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
        log.close()
