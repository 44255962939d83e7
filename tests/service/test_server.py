"""The HTTP layer below the app: head limits, head timeout, connection cap, parser errors, the runner.

Real gateway processes started by the shared runner (``python -m service.server``, as the Procfile
does), spoken to over raw sockets where the case is below HTTP clients' reach.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from config.settings import Settings, SettingsError
from service.mock_upstream import MockUpstream
from service.server import KEEP_ALIVE_SECONDS, PROTOCOL, uvicorn_config
from tests import support
from tests.support import (
    BIN,
    ROOT,
    GatewayProcess,
    RawResponse,
    answers,
    free_port,
    gateway_env,
    launch,
    parse_response,
    procfile_command,
    start_gateway,
    wait_until,
    with_bin_on_path,
)

LINE = 16 * 1024  # the defaults
HEAD = 64 * 1024


def connect(gw: GatewayProcess) -> socket.socket:
    return support.connect(gw.url)


def read_answer(sock: socket.socket, timeout: float = 10.0) -> RawResponse:
    """One response on a kept-alive connection: its head, then a content-length body (every answer
    here has one)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        data += receive(sock, deadline)
    answer = parse_response(data)
    while len(answer.body) < int(answer.headers["content-length"]):
        answer.body += receive(sock, deadline)
    return answer


def receive(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = sock.recv(65536)
    if not chunk:
        raise AssertionError("the connection closed before a whole response arrived")
    return chunk


def wait_closed(sock: socket.socket, timeout: float) -> bytes:
    """Read until the server closes the connection; what it sent meanwhile. Fails past ``timeout``."""
    deadline = time.monotonic() + timeout
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the connection is still open after {timeout} s")


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


answer_of = parse_response


def request(path: str, *headers: tuple[str, str], request_id: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway.test"]
    if request_id:
        lines.append(f"x-request-id: {request_id}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_and_read(gw: GatewayProcess, data: bytes) -> tuple[RawResponse, socket.socket]:
    sock = connect(gw)
    sock.sendall(data)
    return read_answer(sock), sock


def healthz_at_once(gw: GatewayProcess) -> None:
    response = httpx.get(f"{gw.url}/healthz", timeout=5)
    assert response.status_code == 200


# -- head size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe",
    [
        pytest.param(request("/tokens", ("X-Big", "a" * LINE)), id="one header line over 16 KiB"),
        pytest.param(request("/tokens", *[(f"X-Fill-{i}", "a" * 15_000) for i in range(5)]), id="75 KB of headers"),
        pytest.param(request("/tokens?q=" + "a" * LINE), id="URL over 16 KiB"),
    ],
)
def test_a_head_over_the_limits_gets_431_json_before_the_app(gateway: GatewayProcess, probe: bytes) -> None:
    marker = f"probe-{os.urandom(4).hex()}"
    probe = probe.replace(b"Host: gateway.test", f"Host: gateway.test\r\nx-request-id: {marker}".encode())
    answer, sock = send_and_read(gateway, probe)  # unauthenticated: the app would have answered 401/403
    with sock:
        assert answer.status == 431
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["connection"] == "close"
        error = answer.json()
        assert isinstance(error, dict) and list(error) == ["error"] and "too large" in error["error"]
        assert wait_closed(sock, 5) == b""
    healthz_at_once(gateway)
    after = f"after-{marker}"
    assert httpx.get(f"{gateway.url}/healthz", headers={"x-request-id": after}).status_code == 200
    gateway.access_line(after)  # the access line of a later request is out, the probe never had one
    assert marker not in gateway.log_text().replace(after, "")


def test_a_head_over_the_limit_sent_slowly_is_cut_before_it_ends(gateway: GatewayProcess) -> None:
    """The parser is never fed more than the limit: the answer comes while the client is still sending."""
    sock = connect(gateway)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nX-Big: ")
        sent = 0
        while sent < 8 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 4096
            select.select([sock], [], [], 0.001)  # pace the sender: 8 MiB take at least 2 s
        assert sent < 8 * 1024 * 1024, "no answer to a header line of 8 MiB"
        try:
            received = wait_closed(sock, 5)
        except ConnectionResetError:
            received = b""
        if received:  # the answer can be lost to the reset of the bytes still in flight
            assert answer_of(received).status == 431


def test_a_head_just_within_the_limits_is_served(gateway: GatewayProcess) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n"
    line = b"X-Fill-0: " + b"a" * (LINE - len("X-Fill-0: ")) + b"\r\n"  # 16 KiB exactly, CRLF aside
    assert len(line) == LINE + 2
    fill = [line.replace(b"X-Fill-0", f"X-Fill-{i}".encode()) for i in range(3)]
    used = len(start) + sum(map(len, fill)) + 2  # the final CRLF
    last_value = HEAD - used - len(b"X-Last: \r\n")
    head = start + b"".join(fill) + b"X-Last: " + b"a" * last_value + b"\r\n\r\n"
    assert len(head) == HEAD
    answer, sock = send_and_read(gateway, head)
    with sock:
        assert answer.status == 200 and answer.json() == {"status": "ok"}
        # the limits apply to each request on a kept-alive connection, not to the connection
        sock.sendall(head)
        assert read_answer(sock).status == 200


def test_a_large_body_is_not_counted_as_head(gateway: GatewayProcess) -> None:
    body = b'{"teamId": "' + b"t" * (200 * 1024) + b'"}'
    head = f"POST /tokens HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    answer, sock = send_and_read(gateway, head + body)  # one write: head and body arrive together
    with sock:
        assert answer.status in (401, 403, 413)  # the app's answer, not the HTTP layer's


# -- head time --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose request heads must arrive within 1 s."""
    tmp = tmp_path_factory.mktemp("quick")
    process = start_gateway(gateway_env(upstream.url, tmp, HEADER_READ_TIMEOUT_SECONDS="1"), tmp)
    yield process
    process.stop()


def trickle(sock: socket.socket, lines: Iterator[bytes], timeout: float = 15.0) -> tuple[int, bytes]:
    """Send a line every 0.3 s until the server closes the connection; (lines sent, what came back)."""
    deadline = time.monotonic() + timeout
    sent = 0
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.3)
        if readable:
            return sent, wait_closed(sock, 5)
        try:
            sock.sendall(next(lines))
        except (BrokenPipeError, ConnectionResetError):
            return sent, b""
        sent += 1
    raise AssertionError(f"the connection is still open after {timeout} s of trickling")


def header_lines() -> Iterator[bytes]:
    number = 0
    while True:
        number += 1
        yield f"X-Slow-{number}: {number}\r\n".encode()


def test_a_head_trickled_a_line_at_a_time_is_cut_at_the_timeout(quick: GatewayProcess) -> None:
    sock = connect(quick)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n")
        sent, received = trickle(sock, header_lines())
    assert sent >= 1  # each line arrived in time; together they did not
    answer = answer_of(received)
    assert answer.status == 408 and answer.headers["content-type"] == "application/json"
    healthz_at_once(quick)


def test_a_connection_that_sends_nothing_is_closed(quick: GatewayProcess) -> None:
    with connect(quick) as sock:
        assert wait_closed(sock, 15) == b""  # nothing to answer


def test_a_kept_alive_connection_trickling_its_next_head_is_closed_but_an_idle_one_is_kept(
    quick: GatewayProcess,
) -> None:
    answer, sock = send_and_read(quick, request("/healthz"))
    with sock:
        assert answer.status == 200
        # idle past the head timeout: keep-alive rules an idle connection, not the head timeout
        assert not select.select([sock], [], [], 2.5)[0]
        sock.sendall(request("/healthz"))
        assert read_answer(sock).status == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sent, received = trickle(sock, header_lines())
    assert sent >= 1 and answer_of(received).status == 408


# -- connections ------------------------------------------------------------------------------


def test_connections_past_the_cap_are_refused_with_one_warning(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = make_gateway(MAX_CONNECTIONS="5")
    hogs = []
    try:
        for _ in range(5):
            answer, sock = send_and_read(gw, request("/healthz"))  # answered: the worker holds it
            assert answer.status == 200
            hogs.append(sock)
        for _ in range(3):
            with connect(gw) as extra:
                try:
                    refused = wait_closed(extra, 10)
                except ConnectionResetError:
                    refused = b""
                if refused:
                    answer = answer_of(refused)
                    assert answer.status == 503 and answer.headers["content-type"] == "application/json"
        for hog in hogs:
            hog.sendall(request("/healthz"))  # still served
            assert read_answer(hog).status == 200
    finally:
        for hog in hogs:
            hog.close()
    wait_until(lambda: answers(f"{gw.url}/healthz"), 10, "a request served after the hogs closed")
    events = [line["event"] for line in gw.log_lines()]
    assert events.count("connection_limit_reached") == 1
    warning = next(line for line in gw.log_lines() if line["event"] == "connection_limit_reached")
    assert warning["level"] == "warning" and warning["max_connections"] == 5
    assert "connection_limit_cleared" in events


# -- what the parser rejects -------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe",
    [
        pytest.param(b"FOO /healthz HTTP/1.1\r\nHost: gateway.test\r\n\r\n", id="unknown method"),
        pytest.param(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: gateway.test\r\n\r\n", id="raw non-ASCII in the path"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nX-Bad\x01: v\r\n\r\n", id="bad header byte"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nX-Bad: a\x00b\r\n\r\n", id="NUL in a value"),
        pytest.param(b"GET\r\n\r\n", id="malformed request line"),
    ],
)
def test_requests_the_parser_rejects_get_a_json_400(gateway: GatewayProcess, probe: bytes) -> None:
    answer, sock = send_and_read(gateway, probe)
    with sock:
        assert answer.status == 400
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"error": "Invalid HTTP request."}
        assert wait_closed(sock, 5) == b""
    assert "Traceback" not in gateway.log_text()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate", b"identity"])
def test_a_transfer_coding_other_than_chunked_gets_a_json_501(
    gateway: GatewayProcess, upstream: MockUpstream, coding: bytes
) -> None:
    before = len(upstream.received)
    probe = (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    answer, sock = send_and_read(gateway, probe)
    with sock:
        assert answer.status == 501
        assert answer.json() == {"error": "Only the chunked transfer coding is supported."}
        assert wait_closed(sock, 5) == b""
    assert len(upstream.received) == before  # nothing went on
    assert "Traceback" not in gateway.log_text()


def test_chunked_twice_is_invalid(gateway: GatewayProcess) -> None:
    probe = b"POST /healthz HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"
    answer, sock = send_and_read(gateway, probe)
    with sock:
        assert answer.status == 400 and answer.json() == {"error": "Invalid HTTP request."}


def test_a_chunked_body_is_still_read(gateway: GatewayProcess) -> None:
    probe = b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding:  Chunked \r\n\r\n0\r\n\r\n"
    answer, sock = send_and_read(gateway, probe)
    with sock:
        assert answer.status == 200


def test_pipelined_responses_come_back_whole_and_in_order(gateway: GatewayProcess) -> None:
    # a HEAD answer is a head alone: the writer holds it until its response ends, behind the one before
    probe = (
        request("/healthz")
        + request("/healthz").replace(b"GET", b"HEAD", 1)
        + request("/healthz", ("Connection", "close"))
    )
    with connect(gateway) as sock:
        sock.sendall(probe)
        stream = wait_closed(sock, 10)
    bodies = []
    for method in ("GET", "HEAD", "GET"):
        head, _, stream = stream.partition(b"\r\n\r\n")
        answer = parse_response(head + b"\r\n\r\n")
        assert answer.status == 200
        length = int(answer.headers["content-length"]) if method == "GET" else 0
        bodies.append(stream[:length])
        stream = stream[length:]
    assert stream == b""
    assert bodies[0] == bodies[2] != b"" and bodies[1] == b""


# -- the runner -------------------------------------------------------------------------------


def runner_env(tmp_path: Path, upstream: MockUpstream, **overrides: str) -> dict[str, str]:
    return with_bin_on_path(gateway_env(upstream.url, tmp_path, **overrides))


@pytest.mark.parametrize("how", ["runner", "procfile", "gateway serve"])
def test_a_taken_port_exits_5_before_opening_anything(tmp_path: Path, upstream: MockUpstream, how: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = runner_env(tmp_path, upstream, PORT=str(port))
        command = {
            "runner": [str(BIN / "python"), "-m", "service.server"],
            "procfile": ["sh", "-c", procfile_command()],
            "gateway serve": [str(BIN / "gateway"), "serve"],
        }[how]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 5, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and f"port {port} is already in use" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "gateway.db").exists()  # nor the lifespan: no gateway_starting line
    assert "gateway_starting" not in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_HEADER_BYTES", "64k"),
        ("MAX_HEADER_LINE_BYTES", "²"),
        ("MAX_CONNECTIONS", "٣"),
        ("HEADER_READ_TIMEOUT_SECONDS", "0"),
        ("PORT", "80 80"),
        ("WEB_CONCURRENCY", "-1"),
    ],
)
def test_a_malformed_server_setting_stops_the_runner_with_one_line(
    tmp_path: Path, upstream: MockUpstream, name: str, value: str
) -> None:
    env = runner_env(tmp_path, upstream, **{name: value})
    result = subprocess.run(["sh", "-c", procfile_command()], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.decode().strip().splitlines() == [
        next(line for line in result.stderr.decode().splitlines() if line.startswith(f"configuration error: {name}"))
    ]


def test_server_settings_parse_strictly() -> None:
    settings = Settings.from_env({}, env_file=None)
    assert (settings.max_header_bytes, settings.max_header_line_bytes) == (HEAD, LINE)
    assert settings.header_read_timeout_seconds == 10 and settings.max_connections == 10_000
    smaller = Settings.from_env({"MAX_HEADER_BYTES": "8192"}, env_file=None)
    assert smaller.max_header_line_bytes == 8192  # the line limit follows a smaller total down
    with pytest.raises(SettingsError, match="MAX_HEADER_LINE_BYTES"):
        Settings.from_env({"MAX_HEADER_LINE_BYTES": "70000"}, env_file=None)
    for raw in ("²", "1e4", "+5", " 5 5", "5.0"):
        with pytest.raises(SettingsError, match="MAX_CONNECTIONS"):
            Settings.from_env({"MAX_CONNECTIONS": raw}, env_file=None)


def test_every_way_of_starting_shares_one_server_configuration(gateway: GatewayProcess) -> None:
    procfile = procfile_command()
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "python -m service.server" in procfile and "python -m service.server" in recipe
    assert "uvicorn" not in procfile and "uvicorn" not in recipe  # no flags of their own to drift
    assert re.search(r"--host \$\{HOST:-0\.0\.0\.0\}", procfile) and "--host 127.0.0.1" in recipe

    config = uvicorn_config(Settings.from_env({}, env_file=None), "127.0.0.1", 8787, 1)
    assert config.timeout_keep_alive == KEEP_ALIVE_SECONDS == 75
    assert config.http == PROTOCOL and config.loop == "uvloop" and config.backlog == 2048
    assert not config.access_log and not config.server_header and not config.proxy_headers
    assert config.timeout_graceful_shutdown == 30

    # the test gateways run the same runner, and say so
    limits = next(line for line in gateway.log_lines() if line["event"] == "server_limits")
    assert limits["keep_alive_seconds"] == 75 and limits["max_header_bytes"] == HEAD


def test_gateway_serve_runs_the_shared_runner(tmp_path: Path, upstream: MockUpstream) -> None:
    port = free_port()
    env = runner_env(tmp_path, upstream, MAX_CONNECTIONS="7")
    gw = launch([str(BIN / "gateway"), "serve", "--port", str(port)], env, tmp_path, port)  # ready on /healthz
    try:
        limits = next(line for line in gw.log_lines() if line["event"] == "server_limits")
        assert limits["keep_alive_seconds"] == 75 and limits["max_connections"] == 7
        answer, sock = send_and_read(gw, b"FOO / HTTP/1.1\r\n\r\n")
        sock.close()
        assert answer.status == 400 and answer.json() == {"error": "Invalid HTTP request."}
    finally:
        gw.stop()
