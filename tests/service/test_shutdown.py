"""SIGTERM as a PaaS deploy sends it: no new requests, in-flight streams finish within the grace."""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from service.mock_upstream import MockUpstream
from tests.support import (
    GatewayProcess,
    free_port,
    gateway_env,
    launch,
    port_open,
    procfile_command,
    wait_until,
    with_bin_on_path,
)


def start(tmp_path: Path, upstream: MockUpstream, grace: str) -> GatewayProcess:
    """A gateway run by the Procfile's command (``exec``: the signal reaches the runner itself)."""
    port = free_port()
    env = with_bin_on_path(gateway_env(upstream.url, tmp_path, PORT=str(port), SHUTDOWN_GRACE_SECONDS=grace))
    return launch(["sh", "-c", procfile_command()], env, tmp_path, port)


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
        # no new connections once shutdown started (refused from when the listener closes)
        wait_until(lambda: not port_open(gw.port), 5, "the listening socket closing")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gw.url}/healthz", timeout=2)
        rest = [line for line in lines if line.startswith("data:")]
        request_id = response.headers["x-gateway-request-id"]
    assert gw.process.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    events = 1 + len(rest)
    if completes:
        assert events == 21  # every event, then [DONE]
    else:  # cut by the grace: the provider's error event, then a proper end
        assert events < 21
        assert orjson.loads(rest[-1].removeprefix("data: "))["error"]["code"] == "upstream_truncated"
    log = gw.log_text()
    assert '"event":"gateway_stopped"' in log and "Traceback" not in log
    assert gw.access_line(request_id)["truncated"] is not completes
    assert not [line for line in gw.log_lines() if line["level"] in ("error", "critical")]


def test_streams_cut_by_the_grace_are_one_warning_each(tmp_path: Path, upstream: MockUpstream) -> None:
    gw = start(tmp_path, upstream, "1")
    auth = {"authorization": f"Bearer {gw.create_key()}"}
    with (
        httpx.stream("GET", f"{gw.url}/openai/_mock/hang", headers=auth, timeout=30) as stream,
        httpx.stream("GET", f"{gw.url}/openai/_mock/hang?content_type=application/json", headers=auth) as body,
    ):
        stream_lines = stream.iter_lines()
        assert next(stream_lines).startswith("data:")
        body_chunks = body.iter_raw()
        assert next(body_chunks).startswith(b"data:")
        gw.process.send_signal(signal.SIGTERM)
        rest = list(stream_lines)
        with pytest.raises(httpx.RemoteProtocolError):  # not an event stream: an abrupt end
            list(body_chunks)
        ids = [stream.headers["x-gateway-request-id"], body.headers["x-gateway-request-id"]]
    assert gw.process.wait(20) in (0, -signal.SIGTERM)
    last = [line for line in rest if line.startswith("data:")][-1]
    assert orjson.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_truncated"
    lines = gw.log_lines()
    for request_id in ids:
        about = [line for line in lines if line.get("request_id") == request_id]
        assert [(line["event"], line["level"]) for line in about] == [
            ("stream_cut_by_shutdown", "warning"),
            ("request", "info"),
        ]
        assert about[1]["truncated"] is True
    assert not [line for line in lines if line["level"] in ("error", "critical")], gw.log_text()
    assert "CancelledError" not in gw.log_text() and "without completing response" not in gw.log_text()


def test_a_request_still_waiting_for_the_upstream_when_the_grace_ends_gets_a_503(
    tmp_path: Path, upstream: MockUpstream
) -> None:
    gw = start(tmp_path, upstream, "1")
    auth = {"authorization": f"Bearer {gw.create_key()}"}
    answers: list[httpx.Response | Exception] = []
    marker = f"shutdown-{uuid.uuid4().hex}"  # the upstream is shared: earlier tests' slow requests are in its list

    def call() -> None:
        try:
            url = f"{gw.url}/openai/_mock/slow-headers?seconds=30&marker={marker}"
            answers.append(httpx.get(url, headers=auth, timeout=30))
        except httpx.HTTPError as exc:
            answers.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(
        lambda: any(marker in r.query for r in list(upstream.recent)),
        10,
        "the request reaching the upstream",
    )
    gw.process.send_signal(signal.SIGTERM)
    caller.join(20)
    assert gw.process.wait(20) in (0, -signal.SIGTERM)
    assert len(answers) == 1
    answer = answers[0]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    assert "shutting down" in answer.json()["error"]["message"]
    assert "Traceback" not in gw.log_text()
    assert not [line for line in gw.log_lines() if line["level"] in ("error", "critical")], gw.log_text()
