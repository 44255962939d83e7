"""Auth in process, with raw scope/receive/send: which keys pass, which are refused and how, over a
real key cache (``TeamDirectory``) on a real SQLite store, with the real metrics and key guard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from middleware.auth import INVALID, MISSING, Auth
from middleware.key_guard import UnknownKeyGuard
from service.core import keys
from service.core.errors import AuthenticationFailed, TooManyRequests
from service.core.metrics import Metrics
from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import SQLiteStore
from service.core.teams import MAX_REMEMBERED_DIGESTS, UNKNOWN, TeamDirectory


class Reached:
    """The app behind Auth: records the requests that got through."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)


@pytest.fixture
async def teams(tmp_path: Path) -> AsyncIterator[TeamDirectory]:
    store = SQLiteStore(tmp_path / "g.db")
    await store.open()
    yield TeamDirectory(store, refresh_seconds=60)
    await store.close()


def scope_for(
    teams: TeamDirectory,
    metrics: Metrics,
    *headers: tuple[str, str],
    guard: UnknownKeyGuard | None = None,
    peer: str = "10.0.0.1",
) -> dict[str, Any]:
    state: dict[str, object] = {"teams": teams, "metrics": metrics}
    if guard is not None:
        state["guard"] = guard
    return {
        "type": "http",
        "method": "GET",
        "path": "/openai/v1/models",
        "headers": [(name.encode(), value.encode()) for name, value in headers],
        "client": (peer, 50000),
        "state": state,
        SCOPE_KEY: RequestInfo("req-1", 0.0),
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    raise AssertionError(f"Auth answered by itself: {message}")


async def test_a_request_without_a_key_is_refused_as_missing(teams: TeamDirectory) -> None:
    app = Reached()
    metrics = Metrics()
    for headers in ((), (("authorization", "Basic dXNlcjpwdw=="),), (("authorization", "Bearer "),)):
        with pytest.raises(AuthenticationFailed) as refused:
            await Auth(app)(scope_for(teams, metrics, *headers), receive, send)
        assert refused.value is MISSING and refused.value.status == 401
        assert "Missing API key" in refused.value.message
    assert app.scopes == [] and (metrics.cache_hits, metrics.cache_misses) == (0, 0)  # the store never asked


@pytest.mark.parametrize(
    "headers",
    [
        (("authorization", "Bearer sk_not-a-key"),),
        (("x-api-key", "sk_" + "0" * 63),),
        (("authorization", "Bearer " + "sk_" + "g" * 64),),
        (("x-goog-api-key", "whatever"), ("x-api-key", "nope")),
    ],
)
async def test_a_malformed_key_is_refused_as_invalid_without_a_lookup(
    teams: TeamDirectory, headers: tuple[tuple[str, str], ...]
) -> None:
    app = Reached()
    metrics = Metrics()
    with pytest.raises(AuthenticationFailed) as refused:
        await Auth(app)(scope_for(teams, metrics, *headers), receive, send)
    assert refused.value is INVALID and refused.value.status == 401
    assert app.scopes == [] and metrics.cache_misses == 0


async def test_a_valid_key_passes_with_its_team_and_is_then_served_from_the_cache(teams: TeamDirectory) -> None:
    key, team = await teams.issue("team_1", "Acme")
    app = Reached()
    metrics = Metrics()
    auth = Auth(app)

    first = scope_for(teams, metrics, ("authorization", f"Bearer {key}"))
    await auth(first, receive, send)
    assert app.scopes == [first] and first[SCOPE_KEY].team == team
    assert (metrics.cache_hits, metrics.cache_misses) == (0, 1)  # one store query
    assert teams.peek(keys.digest(key)) == team

    again = scope_for(teams, metrics, ("x-api-key", key))  # the Anthropic SDK's header
    await auth(again, receive, send)
    assert app.scopes == [first, again] and again[SCOPE_KEY].team == team
    assert (metrics.cache_hits, metrics.cache_misses) == (1, 1)  # a dict read, no query


async def test_a_valid_keys_digest_is_remembered_only_while_it_is_valid(teams: TeamDirectory) -> None:
    """The request path hashes a key once: its digest is kept for the key's next requests, never for
    an unknown key, and a revoked key is refused and gone from memory (revoked by its id, without the
    secret, in another process: the change marker empties the cache)."""
    key, team = await teams.issue("team_1", "Acme")
    other, _ = await teams.issue("team_2", "Other")
    app = Reached()
    metrics = Metrics()
    auth = Auth(app)
    await auth(scope_for(teams, metrics, ("authorization", f"Bearer {key}")), receive, send)
    assert teams.digests == {key: keys.digest(key)}

    unknown = keys.new_key()
    with pytest.raises(AuthenticationFailed):
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {unknown}")), receive, send)
    assert unknown not in teams.digests

    await auth(scope_for(teams, metrics, ("authorization", f"Bearer {other}")), receive, send)
    assert await teams.revoke(other)
    assert other not in teams.digests and key not in teams.digests  # every entry goes with a change
    with pytest.raises(AuthenticationFailed):
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {other}")), receive, send)

    await auth(scope_for(teams, metrics, ("authorization", f"Bearer {key}")), receive, send)
    assert key in teams.digests
    await teams.store.delete_id(team.key_id)  # as another process would: this cache learns it from the store
    teams.changed(None)
    assert teams.digests == {}
    with pytest.raises(AuthenticationFailed):
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {key}")), receive, send)
    assert [scope[SCOPE_KEY].team.team_id for scope in app.scopes] == ["team_1", "team_2", "team_1"]


async def test_remembered_digests_are_bounded(teams: TeamDirectory) -> None:
    for n in range(MAX_REMEMBERED_DIGESTS + 5):
        key = f"sk_{n:064x}"
        teams.remember(key, keys.digest(key))
        assert len(teams.digests) <= MAX_REMEMBERED_DIGESTS
    assert f"sk_{MAX_REMEMBERED_DIGESTS + 4:064x}" in teams.digests  # the newest is kept


async def test_a_well_formed_bearer_wins_and_provider_key_headers_count_only_where_configured(
    teams: TeamDirectory,
) -> None:
    key, team = await teams.issue("team_1", "Acme")
    metrics = Metrics()
    app = Reached()
    # a malformed x-api-key beside a good bearer: the bearer is taken
    mixed = scope_for(teams, metrics, ("x-api-key", "junk"), ("authorization", f"Bearer {key}"))
    await Auth(app)(mixed, receive, send)
    assert mixed[SCOPE_KEY].team == team

    goog = ("x-goog-api-key", key)
    with pytest.raises(AuthenticationFailed) as refused:  # not a key header of this provider
        await Auth(app)(scope_for(teams, metrics, goog), receive, send)
    assert refused.value is MISSING
    google = scope_for(teams, metrics, goog)
    await Auth(app, key_headers=("x-goog-api-key",))(google, receive, send)
    assert google[SCOPE_KEY].team == team and app.scopes == [mixed, google]


async def test_an_unknown_key_is_refused_as_invalid_and_counted_by_the_key_guard(teams: TeamDirectory) -> None:
    metrics = Metrics()
    guard = UnknownKeyGuard(2)
    app = Reached()
    auth = Auth(app)
    guesses = [keys.new_key() for _ in range(2)]
    for guess in guesses:
        with pytest.raises(AuthenticationFailed) as refused:
            await auth(scope_for(teams, metrics, ("authorization", f"Bearer {guess}"), guard=guard), receive, send)
        assert refused.value is INVALID
        assert teams.peek(keys.digest(guess)) is UNKNOWN  # the miss is cached
    assert metrics.cache_misses == 2 and app.scopes == []

    # the address has spent its unknown keys: held back before any store query
    third = keys.new_key()
    with pytest.raises(TooManyRequests) as held:
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {third}"), guard=guard), receive, send)
    assert held.value.status == 429 and dict(held.value.headers)[b"retry-after"] == b"60"
    assert metrics.cache_misses == 2 and teams.peek(keys.digest(third)) is None
    assert guard.retry_after("10.0.0.2") is None  # another address is not affected

    # a cached unknown key (a client retrying its revoked key) costs no query and is not counted
    other = UnknownKeyGuard(2)
    for _ in range(5):
        retry = scope_for(teams, metrics, ("authorization", f"Bearer {guesses[0]}"), guard=other, peer="10.0.0.3")
        with pytest.raises(AuthenticationFailed):
            await auth(retry, receive, send)
    assert other.retry_after("10.0.0.3") is None and metrics.cache_misses == 2


async def test_a_key_seen_valid_still_passes_while_its_address_is_held_back(teams: TeamDirectory) -> None:
    key, team = await teams.issue("team_1", "Acme")
    metrics = Metrics()
    guard = UnknownKeyGuard(1)
    app = Reached()
    auth = Auth(app)
    await auth(scope_for(teams, metrics, ("authorization", f"Bearer {key}"), guard=guard), receive, send)
    with pytest.raises(AuthenticationFailed):
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {keys.new_key()}"), guard=guard), receive, send)
    assert guard.retry_after("10.0.0.1") is not None
    teams.clear()  # the cache emptied by a write elsewhere: the key is no longer cached, but was seen valid
    real = scope_for(teams, metrics, ("authorization", f"Bearer {key}"), guard=guard)
    await auth(real, receive, send)
    assert real[SCOPE_KEY].team == team
    with pytest.raises(TooManyRequests):  # a key never seen is still held back
        await auth(scope_for(teams, metrics, ("authorization", f"Bearer {keys.new_key()}"), guard=guard), receive, send)
