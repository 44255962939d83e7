"""Merging the client's cf-aig-metadata with the team's."""

from __future__ import annotations

import orjson

from middleware.metadata import merge_metadata


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
