"""The Procfile's web command, run as a PaaS runs it: several workers on $PORT, each with the gateway's
HTTP protocol class and the limits of the settings."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from service.mock_upstream import MockUpstream
from tests.support import (
    ADMIN_KEY,
    GATEWAY_TOKEN,
    exchange,
    free_port,
    launch,
    procfile_command,
    wait_until,
    with_bin_on_path,
)


def test_procfile_serves_with_two_workers_and_revocation_reaches_every_worker(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    port = free_port()
    env = with_bin_on_path(
        {
            **os.environ,
            "PORT": str(port),
            "WEB_CONCURRENCY": "2",
            "AI_GATEWAY_URL": upstream.url,
            "AI_GATEWAY_TOKEN": GATEWAY_TOKEN,
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
            "MAX_HEADER_LINE_BYTES": "4096",
        }
    )
    # its own session: the workers are signalled with the runner at the end
    gw = launch(["sh", "-c", procfile_command()], env, tmp_path, port, ready_path="/readyz", new_session=True)
    url = gw.url
    try:
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
        pids = {line for line in gw.log_text().splitlines() if "Started server process" in line}
        assert len(pids) == 2

        assert httpx.delete(f"{url}/tokens/{first}", headers=admin).status_code == 204
        rotated = httpx.post(f"{url}/tokens/{second}/refresh").json()["apiKey"]
        # every worker learns of both within the refresh period; polled, with room for a slow machine
        wait_until(lambda: statuses(first) == {401}, 10, "every worker refusing the revoked key")
        wait_until(lambda: statuses(second) == {401}, 10, "every worker refusing the rotated-away key")
        assert statuses(first) == {401}
        assert statuses(second) == {401}
        assert statuses(rotated) == {200}

        # every worker speaks through the gateway's protocol class, with the limit set in the environment
        for _ in range(8):
            answer = exchange(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 431 ") and b"application/json" in answer
        assert httpx.get(f"{url}/healthz", headers={"x-big": "a" * 4000}).status_code == 200
    finally:
        os.killpg(gw.process.pid, signal.SIGTERM)
        gw.process.wait(20)
