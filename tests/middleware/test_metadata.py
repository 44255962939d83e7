"""Merging the client's cf-aig-metadata with the team's, and the Metadata middleware in process."""

from __future__ import annotations

import orjson
import structlog.testing
from starlette.types import Message, Receive, Scope, Send

from middleware.metadata import Metadata, merge_metadata
from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import Team


def merged(client: bytes | None) -> tuple[dict[str, object], str | None]:
    value, problem = merge_metadata("team_1", "Acme", "req-1", client)
    return orjson.loads(value), problem


def test_ours_come_first_and_client_entries_follow() -> None:
    value, problem = merged(b'{"user": "u", "score": 1.5, "ok": false}')
    assert list(value.items()) == [
        ("team_id", "team_1"),
        ("team_name", "Acme"),
        ("request_id", "req-1"),
        ("user", "u"),
        ("score", 1.5),
    ]
    assert problem is None


def test_collisions_and_non_scalars_are_ignored() -> None:
    value, _ = merged(b'{"team_id": "evil", "request_id": "x", "a": [1], "b": {"c": 1}, "d": null, "e": 7}')
    assert value == {"team_id": "team_1", "team_name": "Acme", "request_id": "req-1", "e": 7}


def test_invalid_client_metadata_is_dropped_with_a_reason() -> None:
    for raw, reason in (
        (b"{nope", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b"3", "not a JSON object"),
    ):
        value, problem = merged(raw)
        assert list(value) == ["team_id", "team_name", "request_id"]
        assert problem == reason
    assert merged(None) == ({"team_id": "team_1", "team_name": "Acme", "request_id": "req-1"}, None)


def test_near_duplicates_of_our_keys_are_dropped() -> None:
    for key in (
        "Team_ID",
        "team_id ",
        " team-id",
        "TEAM_NAME",
        "team name",
        "Request-Id",
        "\uff54\uff45\uff41\uff4d\uff3f\uff49\uff44",
        "team\u200b_id",
    ):
        value, problem = merged(orjson.dumps({key: "evil", "user": "u"}))
        assert value == {"team_id": "team_1", "team_name": "Acme", "request_id": "req-1", "user": "u"}, key
        assert problem is None


def test_client_metadata_over_1_kib_is_dropped_whole() -> None:
    raw = orjson.dumps({"user": "u", "pad": "x" * 1024})
    value, problem = merged(raw)
    assert list(value) == ["team_id", "team_name", "request_id"] and problem == "over 1024 bytes"
    value, problem = merged(orjson.dumps({"user": "u", "pad": "x" * 200}))
    assert value["pad"] == "x" * 200 and problem is None


def test_long_values_long_keys_and_gateway_keys_are_dropped() -> None:
    gateway_key = "sk_" + "ab" * 32
    value, _ = merged(orjson.dumps({"long": "v" * 257, "k" * 65: 1, "leak": f"key {gateway_key}", "ok": "v" * 256}))
    assert value == {"team_id": "team_1", "team_name": "Acme", "request_id": "req-1", "ok": "v" * 256}


# -- the Metadata middleware in process, with raw scope/receive/send ---------------------------


class Reached:
    """The rest of the chain: records the requests that got through."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)


def metadata() -> Metadata:
    return Metadata(Reached())


async def through_metadata(middleware: Metadata, team: Team, request_id: str, *headers: tuple[bytes, bytes]) -> str:
    """Run one request through ``middleware``; the header value it left for the relay."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError(f"Metadata answered by itself: {message}")

    info = RequestInfo(request_id, 0.0)
    info.team = team
    scope = {"type": "http", "method": "GET", "path": "/openai/v1/models", "headers": list(headers), SCOPE_KEY: info}
    await middleware(scope, receive, send)
    reached = middleware.app
    assert isinstance(reached, Reached) and reached.scopes[-1] is scope  # passed on, whatever the client sent
    assert info.metadata is not None
    return info.metadata


TEAM = Team("team_1", "Acme", "2025-01-09T12:00:00.000Z", "key_0123456789abcdef")


async def test_the_header_value_built_for_a_team_names_it_and_the_request() -> None:
    middleware = metadata()
    first = await through_metadata(middleware, TEAM, "req-1")
    assert list(orjson.loads(first).items()) == [("team_id", "team_1"), ("team_name", "Acme"), ("request_id", "req-1")]
    second = await through_metadata(middleware, TEAM, "req-2")  # the team's part is reused: same shape
    assert orjson.loads(second) == {"team_id": "team_1", "team_name": "Acme", "request_id": "req-2"}
    # without client metadata the value is what merging nothing gives, byte for byte
    assert first == merge_metadata("team_1", "Acme", "req-1", None)[0]


async def test_team_names_reach_the_header_as_ascii_json() -> None:
    team = Team("team_ü", 'Équipe "☃"\x7f', "c", "key_0123456789abcdef")
    value = await through_metadata(metadata(), team, "req-1")
    assert value.isascii() and "\x7f" not in value
    assert orjson.loads(value) == {"team_id": "team_ü", "team_name": 'Équipe "☃"\x7f', "request_id": "req-1"}


async def test_client_metadata_is_merged_after_ours() -> None:
    value = await through_metadata(
        metadata(), TEAM, "req-1", (b"cf-aig-metadata", b'{"user": "u", "team_id": "evil", "n": 2}')
    )
    assert list(orjson.loads(value).items()) == [
        ("team_id", "team_1"),
        ("team_name", "Acme"),
        ("request_id", "req-1"),
        ("user", "u"),
        ("n", 2),
    ]


async def test_invalid_client_metadata_is_dropped_and_logged_not_refused() -> None:
    with structlog.testing.capture_logs() as logs:
        value = await through_metadata(metadata(), TEAM, "req-9", (b"cf-aig-metadata", b"[1]"))
    assert orjson.loads(value) == {"team_id": "team_1", "team_name": "Acme", "request_id": "req-9"}
    assert [(line["event"], line["request_id"], line["reason"]) for line in logs] == [
        ("client_metadata_dropped", "req-9", "not a JSON object")
    ]
    with structlog.testing.capture_logs() as logs:
        await through_metadata(metadata(), TEAM, "req-10", (b"cf-aig-metadata", b'{"user": "u"}'))
    assert logs == []  # valid metadata: nothing to say
