"""RequestContext in process, with raw scope/receive/send: the one error boundary and the access line."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from middleware.context import RequestContext
from service.core.errors import NotFound, TooManyRequests
from service.core.metrics import Metrics
from service.core.request import SCOPE_KEY, new_request_id
from service.core.store import StoreUnavailableError


def scope(path: str = "/openai/v1/models", request_id: str = "req-1") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"x-request-id", request_id.encode())],
    }


async def call(app: Any, shape: str = "openai") -> tuple[list[Message], list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []
    sent: list[Message] = []

    async def inner(s: Scope, receive: Receive, send: Send) -> None:
        s[SCOPE_KEY].error_shape = shape
        await app(s, receive, send)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    context = RequestContext(inner, write_access=lines.append, metrics=Metrics())
    await context(scope(), receive, send)
    return sent, lines


def body_of(sent: list[Message]) -> Any:
    return orjson.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


async def test_a_hop_that_raises_a_gateway_error_is_answered_in_its_provider_shape() -> None:
    async def refusing(s: Scope, receive: Receive, send: Send) -> None:
        raise TooManyRequests("slow down", headers=[(b"retry-after", b"7")])

    sent, lines = await call(refusing, "anthropic")
    assert sent[0]["status"] == 429 and (b"retry-after", b"7") in sent[0]["headers"]
    own = dict(sent[0]["headers"])[b"x-gateway-request-id"].decode()
    assert own != "req-1" and lines[0]["request_id"] == own and lines[0]["client_request_id"] == "req-1"
    body = body_of(sent)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error" and body["request_id"] == own
    assert lines[0]["status"] == 429 and lines[0]["truncated"] is False


@pytest.mark.parametrize("shape", ["openai", "anthropic", "google", "cloudflare", "cohere", "plain"])
async def test_an_unexpected_exception_in_a_hop_is_a_json_500_with_the_request_id(shape: str) -> None:
    async def broken(s: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("the secret sk_" + "a" * 64)

    sent, lines = await call(broken, shape)
    assert sent[0]["status"] == 500
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    assert lines[0]["request_id"] in text and "secret" not in text and "Traceback" not in text
    assert lines[0]["status"] == 500 and lines[0]["truncated"] is False  # answered whole: not truncated


async def test_the_store_being_down_is_its_503() -> None:
    async def storeless(s: Scope, receive: Receive, send: Send) -> None:
        raise StoreUnavailableError("connection refused to postgresql://user:pw@db")

    sent, _ = await call(storeless)
    assert sent[0]["status"] == 503
    assert "key store is unavailable" in body_of(sent)["error"]["message"] and "pw@db" not in str(sent)


async def test_a_response_that_started_and_did_not_finish_is_truncated() -> None:
    async def cut(s: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise NotFound("too late to say so")

    sent, lines = await call(cut)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # nothing after the start
    assert lines[0]["status"] == 200 and lines[0]["truncated"] is True


async def test_a_finished_response_is_not_truncated() -> None:
    async def fine(s: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    _, lines = await call(fine)
    assert lines[0]["truncated"] is False and lines[0]["bytes_out"] == 2


def test_request_ids_are_unique_sort_by_time_and_a_forked_child_draws_its_own() -> None:
    ids = [new_request_id(1_700_000_000_000 + n // 100) for n in range(1000)]  # past several refills
    assert len(set(ids)) == 1000 and ids == sorted(ids, key=lambda i: i[:12])
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    new_request_id(0)  # the parent holds random digits drawn before the fork
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        os.write(write, "".join(new_request_id(0) for _ in range(64)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        theirs = pipe.read()
    mine = "".join(new_request_id(0) for _ in range(64))
    assert len(theirs) == len(mine) == 64 * 32
    assert not {theirs[i : i + 32] for i in range(0, len(theirs), 32)} & {
        mine[i : i + 32] for i in range(0, len(mine), 32)
    }


async def test_a_finished_request_lets_go_of_what_it_held() -> None:
    # an idle kept-alive connection keeps its last request's scope until the next request begins, and
    # the scope is part of a reference cycle: the request's info, the relay's exchange, the state copy
    # and the headers go when it ends instead
    async def answering(s: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    held = scope()
    headers = held["headers"]
    await RequestContext(answering, write_access=None, metrics=Metrics())(held, receive_nothing, discard)
    assert held == {} and headers == []


async def receive_nothing() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    pass


async def test_a_cancelled_request_keeps_its_scope_for_the_servers_own_answer() -> None:
    # uvicorn answers a request whose app ended by an exception (a cancellation included) before
    # responding with its own 500, and reads the request's method from the scope to do so
    async def waiting(s: Scope, receive: Receive, send: Send) -> None:
        raise asyncio.CancelledError

    held = scope()
    with pytest.raises(asyncio.CancelledError):
        await RequestContext(waiting, write_access=None, metrics=Metrics())(held, receive_nothing, discard)
    assert held["method"] == "GET" and held["headers"]


async def test_a_request_that_returns_without_answering_keeps_its_scope_for_the_servers_own_answer() -> None:
    async def silent(s: Scope, receive: Receive, send: Send) -> None:
        return None

    held = scope()
    await RequestContext(silent, write_access=None, metrics=Metrics())(held, receive_nothing, discard)
    assert held["method"] == "GET" and held["headers"]
