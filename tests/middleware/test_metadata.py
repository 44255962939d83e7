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
