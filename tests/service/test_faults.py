"""Faults with real processes: a broken upstream, a name that does not resolve, a locked database.
For each: what the client gets, the log line, and that the next request is served."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import ADMIN_KEY, GatewayProcess

BEHAVIOURS = {
    "garbage": b"\x00\x01 this is not HTTP at all \xff\xfe\r\n\r\n",
    "half-head": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-le",
    "half-body": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"partial":',
    "bad-status": b"HTTP/1.1 abc Nope\r\ncontent-length: 0\r\n\r\n",
    "ok": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}',
}


class BrokenUpstream:
    """A TCP server that reads a request head and answers with the bytes of the behaviour named in
    the path (``/openai/garbage``), then closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            name = path.rstrip("/").rsplit("/", 1)[-1]
            conn.sendall(BEHAVIOURS.get(name, BEHAVIOURS["ok"]))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def broken() -> Iterator[BrokenUpstream]:
    server = BrokenUpstream()
    yield server
    server.close()


def _events(gw: GatewayProcess, request_id: str) -> list[str]:
    return [str(line["event"]) for line in gw.log_lines() if line.get("request_id") == request_id]


@pytest.mark.parametrize("behaviour", ["garbage", "half-head", "bad-status"])
def test_an_upstream_answering_garbage_is_502_and_the_next_request_is_served(
    make_gateway: Callable[..., GatewayProcess], broken: BrokenUpstream, behaviour: str
) -> None:
    gw = make_gateway(upstream_url=broken.url)
    key = gw.create_key()
    auth = {"authorization": f"Bearer {key}"}
    response = httpx.get(f"{gw.url}/openai/{behaviour}", headers=auth)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    request_id = response.headers["x-gateway-request-id"]
    assert request_id in response.json()["error"]["message"]
    gw.access_line(request_id)
    assert "upstream_unavailable" in _events(gw, request_id)
    assert httpx.get(f"{gw.url}/openai/ok", headers=auth).json() == {"ok": True}
    assert "Traceback" not in gw.log_text()


def test_an_upstream_body_cut_short_ends_the_response_and_is_logged(
    make_gateway: Callable[..., GatewayProcess], broken: BrokenUpstream
) -> None:
    gw = make_gateway(upstream_url=broken.url)
    key = gw.create_key()
    auth = {"authorization": f"Bearer {key}"}
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", f"{gw.url}/openai/half-body", headers=auth) as response:
        request_id = response.headers["x-gateway-request-id"]
        response.read()
    line = gw.access_line(request_id)
    assert line["truncated"] is True and line["status"] == 200
    assert "upstream_truncated" in _events(gw, request_id)
    assert httpx.get(f"{gw.url}/openai/ok", headers=auth).json() == {"ok": True}


def test_a_name_that_does_not_resolve_is_502_through_the_sdk(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(upstream_url="http://upstream.invalid:9")
    key = gw.create_key()
    client = openai.OpenAI(api_key=key, base_url=f"{gw.url}/openai/v1", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    request_id = raised.value.response.headers["x-gateway-request-id"]
    assert "upstream_unavailable" in _events(gw, request_id)
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_a_locked_database_delays_a_write_without_losing_it(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """While another process holds the write lock, a write waits for it, and lookups do not wait
    behind that write: not only keys already verified (answered from memory), but keys this process
    has not seen yet and the token API's reads, which the database answers (WAL readers never wait)."""
    gw = make_gateway()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    key = gw.create_key("team_locked")
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    unused = httpx.post(f"{gw.url}/tokens", json={"teamId": "team_unused"}, headers=admin).json()  # never used
    database = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None, timeout=10)
    database.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    results: list[httpx.Response] = []
    writer = threading.Thread(
        target=lambda: results.append(
            httpx.post(f"{gw.url}/tokens", json={"teamId": "team_during_lock"}, headers=admin, timeout=30)
        )
    )
    writer.start()
    try:
        # each within httpx's default timeout (5 s), well short of the write's wait for the lock (10 s)
        models = httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {unused['apiKey']}"})
        assert models.status_code == 200  # a key not cached yet: looked up in the database
        shown = httpx.get(f"{gw.url}/tokens/{unused['apiKey']}")
        assert shown.status_code == 200 and shown.json()["teamId"] == "team_unused"
        for _ in range(10):  # never cached: each one a database read
            assert httpx.get(f"{gw.url}/keys/{unused['keyId']}", headers=admin).status_code == 200
            assert httpx.get(f"{gw.url}/tokens", headers=admin).status_code == 200
            assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
        assert not results  # the write still waits for the lock
    finally:
        database.execute("ROLLBACK")
        database.close()
    writer.join(30)
    assert results[0].status_code == 201
    issued = results[0].json()["apiKey"]
    assert httpx.get(f"{gw.url}/openai/models", headers={"authorization": f"Bearer {issued}"}).status_code == 200
    listed = httpx.get(f"{gw.url}/tokens", headers=admin).json()["tokens"]
    assert sorted(token["teamId"] for token in listed) == ["team_during_lock", "team_locked", "team_unused"]
    assert "Traceback" not in gw.log_text()
