"""`gateway mock-upstream --show`: a person can see what reached the fake Cloudflare gateway."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import httpx
import orjson

from tests.support import BIN, GATEWAY_TOKEN, GatewayProcess, free_port, wait_for_port


def test_the_mock_shows_what_it_received_and_never_the_team_key(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    port = free_port()
    mock = subprocess.Popen(
        [str(BIN / "gateway"), "mock-upstream", "--port", str(port), "--token", GATEWAY_TOKEN, "--show"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        gw = make_gateway(upstream_url=f"http://127.0.0.1:{port}")
        key = gw.create_key("team_shown", "Shown")
        reply = httpx.post(
            f"{gw.url}/openai/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": []},
            headers={"authorization": f"Bearer {key}"},
        )
        assert reply.status_code == 200
        recent = httpx.get(f"http://127.0.0.1:{port}/__requests").json()
        assert recent[-1]["path"] == "/openai/chat/completions"
        metadata = orjson.loads(recent[-1]["headers"]["cf-aig-metadata"])
        assert metadata["team_id"] == "team_shown"
        assert GATEWAY_TOKEN not in str(recent) and key not in str(recent)
    finally:
        mock.terminate()
        out, _ = mock.communicate(timeout=10)
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(line["path"] == "/openai/chat/completions" for line in lines)
    assert key not in out and GATEWAY_TOKEN not in out
