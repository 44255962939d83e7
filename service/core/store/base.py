"""The store interface every backend implements. Keys never reach a store: only their digests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from service.core.access import Access, access_for
from service.core.limits.model import Limits

if TYPE_CHECKING:  # service.core.ledger imports this module: the row class is for annotations only
    from service.core.ledger import LedgerRow, LedgerValues
    from service.core.store.usage import FailureRows, ReportRows


def utc_timestamp() -> str:
    """Now, as the token API shows times: ``2025-01-09T12:00:00.000Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class StoreUnavailableError(Exception):
    """The database could not be reached or answered with an error."""


MAX_MESSAGE = 300
"""Characters of the driver's message kept in a ``StoreUnavailableError``: enough to diagnose."""


class unavailable_on:  # lower case, as contextlib.suppress: used like a function
    """Turn a database driver's errors into ``StoreUnavailableError`` in one place, for a whole
    block (``with`` works around ``await`` too): ``with unavailable_on(sqlite3.Error): ...``.

    The message is ``[context: ]ErrorType: driver message``, cut short, with every string of
    ``hide`` (a password, a DSN) replaced by ``***``: the message is logged and must never carry a
    secret. Other exceptions (cancellation included) pass through untouched. An instance holds no
    state of its own, so a store keeps one and uses it from any number of tasks at once.
    """

    __slots__ = ("context", "errors", "hide")

    def __init__(self, *errors: type[BaseException], context: str = "", hide: Iterable[str | None] = ()) -> None:
        self.errors = errors
        self.context = context
        self.hide = tuple(sorted((secret for secret in hide if secret), key=len, reverse=True))

    def __call__(self, context: str) -> unavailable_on:
        """The same mapping with a context for its messages (``"cannot open the store"``)."""
        return unavailable_on(*self.errors, context=context, hide=self.hide)

    def message(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for secret in self.hide:
            text = text.replace(secret, "***")
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 1] + "…"
        return f"{self.context}: {text}" if self.context else text

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is not None and isinstance(exc, self.errors):
            raise StoreUnavailableError(self.message(exc)) from exc


def epoch(timestamp: str) -> float:
    """A stored time (``2025-01-09T12:00:00.000Z``) as seconds since the epoch."""
    return datetime.fromisoformat(timestamp).timestamp()


def timestamp_at(seconds: float) -> str:
    """Seconds since the epoch as a stored time (``2025-01-09T12:00:00.000Z``)."""
    at = datetime.fromtimestamp(seconds, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def list_column(values: tuple[str, ...] | None) -> str | None:
    """An allow-list as stored: a JSON array as text, ``NULL`` for no list."""
    return None if values is None else orjson.dumps(list(values)).decode()


def list_value(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    values = orjson.loads(text)
    return tuple(str(value) for value in values) if isinstance(values, list) else None


@dataclass(frozen=True, slots=True)
class Team:
    """What a key grants: the team it belongs to, as stored beside its digest, and the key's
    governance (allow-lists, expiry) as the request path checks it."""

    team_id: str
    name: str
    created_at: str
    key_id: str = ""
    """The key's stable, non-secret id (``key_`` + 16 hex), kept across rotation."""
    key_limits: Limits | None = None
    """The key's own limits (``None``: none set)."""
    team_limits: Limits | None = None
    """The team's limits, which every key of the team passes too (``None``: none set)."""
    allowed_models: tuple[str, ...] | None = None
    """The key's own model allow-list (the team's is in ``access`` only)."""
    allowed_providers: tuple[str, ...] | None = None
    expires_at: str | None = None
    access: Access | None = None
    """Every allow-list that applies to the key (its own and its team's); ``None``: none does."""
    expires: float | None = None
    """``expires_at`` in seconds since the epoch."""
    grace_until: float | None = None
    """Set when the secret presented is the key's previous one (rotated with a grace period): the
    time, in seconds since the epoch, it stops being accepted."""


TEAM_SELECT = (
    "k.team_id, k.name, k.created_at, k.key_id, k.allowed_models, k.allowed_providers, k.expires_at,"
    " t.allowed_models, t.allowed_providers"
)
"""What ``Team.from_row`` reads (then the previous secret's deadline), over ``tokens k LEFT JOIN teams t``."""


def team_from_row(
    row: Any, grace_until: str | None = None, key_limits: Limits | None = None, team_limits: Limits | None = None
) -> Team:
    key_models, key_providers = list_value(row[4]), list_value(row[5])
    expires_at = row[6]
    return Team(
        row[0],
        row[1],
        row[2],
        row[3],
        allowed_models=key_models,
        allowed_providers=key_providers,
        expires_at=expires_at,
        access=access_for(key_models, key_providers, list_value(row[7]), list_value(row[8])),
        expires=None if expires_at is None else epoch(expires_at),
        grace_until=None if grace_until is None else epoch(grace_until),
        key_limits=key_limits,
        team_limits=team_limits,
    )


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A key as listed: never the key, only its id and first characters."""

    key_id: str
    key_prefix: str
    team_id: str
    name: str
    created_at: str
    last_used_at: str | None
    allowed_models: tuple[str, ...] | None = None
    allowed_providers: tuple[str, ...] | None = None
    expires_at: str | None = None


RECORD_COLUMNS = (
    "key_id, key_prefix, team_id, name, created_at, last_used_at, allowed_models, allowed_providers, expires_at, digest"
)
"""What ``record_from_row`` reads, then the digest (a listing's position)."""


def record_from_row(row: Any) -> TokenRecord:
    return TokenRecord(row[0], row[1], row[2], row[3], row[4], row[5], list_value(row[6]), list_value(row[7]), row[8])


@dataclass(frozen=True, slots=True)
class Removed:
    """A key deleted: who it was, and the digests to drop from caches (its secret, and the
    previous one while a rotation's grace period runs)."""

    key_id: str
    team_id: str
    digests: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TeamSettings:
    """A team's own settings (a row of ``teams``): its allow-lists."""

    team_id: str
    updated_at: str
    allowed_models: tuple[str, ...] | None = None
    allowed_providers: tuple[str, ...] | None = None


KEY_COLUMNS = frozenset({"allowed_models", "allowed_providers", "expires_at", "expiry_recorded"})
"""The key columns ``update_key`` may set (values are parameters; names only come from here)."""
TEAM_COLUMNS = frozenset({"allowed_models", "allowed_providers"})
"""The team columns ``update_team`` may set."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One change, as the audit trail keeps it: never a secret."""

    id: str
    at: str
    action: str
    actor: str
    team_id: str | None
    key_id: str | None
    changes: dict[str, Any]
    client_address: str | None = None
    request_id: str | None = None


AUDIT_COLUMNS = "id, at, action, actor, team_id, key_id, changes, client_address, request_id"


def audit_from_row(row: Any) -> AuditEvent:
    return AuditEvent(row[0], row[1], row[2], row[3], row[4], row[5], orjson.loads(row[6]), row[7], row[8])


def audit_params(event: AuditEvent) -> tuple[object, ...]:
    return (
        event.id,
        event.at,
        event.action,
        event.actor,
        event.team_id,
        event.key_id,
        orjson.dumps(event.changes).decode(),
        event.client_address,
        event.request_id,
    )


AUDIT_FILTERS = ("team_id", "key_id", "action")


@dataclass(frozen=True, slots=True)
class TeamSummary:
    """A team as the team API lists it: from its keys, with its limits and allow-lists."""

    team_id: str
    name: str
    key_count: int
    limits: Limits | None
    allowed_models: tuple[str, ...] | None = None
    """The team's own allow-lists, for every key it has."""
    allowed_providers: tuple[str, ...] | None = None
    updated_at: str | None = None
    """When the team's settings (limits, allow-lists) last changed; ``None``: never set."""


class TokenStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailableError`` unless the database answers."""

    async def create(self, digest: str, team: Team, key_prefix: str) -> None:
        """Store a new key; ``team.key_id`` is its id, with its allow-lists and expiry."""

    async def get(self, digest: str) -> Team | None:
        """The key whose secret has this digest, or whose previous secret it is while the grace of
        its rotation runs (then ``grace_until`` is set); with its team's allow-lists."""

    async def replace(
        self, old_digest: str, new_digest: str, new_prefix: str, grace_until: str | None = None
    ) -> Team | None:
        """Move a key's record to a new digest (rotation), keeping its id; ``None`` if the old one is
        unknown. With ``grace_until`` the old digest stays accepted until then (one previous secret:
        a rotation replaces the one before), else it stops at once."""

    async def delete(self, digest: str) -> Removed | None:
        """Delete the key with this secret (or previous secret, while its grace runs)."""

    async def find(self, key_id: str) -> TokenRecord | None:
        """The key with this id, or ``None``."""

    async def delete_id(self, key_id: str) -> Removed | None:
        """Delete the key with this id, or ``None`` if unknown."""

    async def delete_team(self, team_id: str) -> list[Removed]:
        """Delete every key of a team."""

    async def update_key(self, key_id: str, columns: Mapping[str, object]) -> tuple[str, ...] | None:
        """Set ``columns`` (names from ``KEY_COLUMNS``) of the key with this id; the digests to drop
        from caches, or ``None`` if unknown."""

    async def team_settings(self, team_id: str) -> TeamSettings | None:
        """A team's own settings, or ``None`` when it has none."""

    async def update_team(self, team_id: str, columns: Mapping[str, object], updated_at: str) -> None:
        """Set ``columns`` (names from ``TEAM_COLUMNS``) of a team's settings, creating its row."""

    async def count_keys(self, team_id: str) -> int:
        """How many keys the team has."""

    async def record_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append events to the audit trail."""

    async def audit(
        self, limit: int, after: tuple[str, str] | None, filters: Mapping[str, str], start: str | None, end: str | None
    ) -> list[AuditEvent]:
        """Up to ``limit`` audit events, newest first, before the ``(at, id)`` position, filtered on
        ``AUDIT_FILTERS`` (exact) and ``start`` (included) to ``end`` (excluded)."""

    async def note_expired(self, now: str) -> list[tuple[str, str, str]]:
        """Mark the keys expired by ``now`` whose expiry is not yet recorded; ``(key_id, team_id,
        expires_at)`` of each, to this caller only (so that the expiry is recorded once, whichever
        of many processes gets there first)."""

    async def list(
        self, limit: int, after: tuple[str, str] | None = None, team_id: str | None = None
    ) -> list[tuple[TokenRecord, str]]:
        """Up to ``limit`` keys (of one team, when ``team_id`` is given) in creation order after the
        ``(created_at, digest)`` position, each with its digest (the position to continue from)."""

    async def touch(self, used: dict[str, str]) -> None:
        """Record ``last_used_at`` for the given digests (digest → timestamp)."""

    async def change_marker(self) -> int:
        """A number that changes whenever another process writes; caches compare it to stay fresh."""

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(digest)`` as other processes change keys (``None``: anything may have
        changed), where the database can tell; a no-op where it cannot."""

    async def set_limits(self, scope: str, ident: str, limits: Limits) -> bool:
        """Replace a team's (``scope="team"``, by team id; its row is created) or a key's (``"key"``,
        by key id) limits; ``False`` when there is no such key. Caches everywhere drop what they hold."""

    async def limits_of(self, scope: str, ident: str) -> Limits | None:
        """A team's or a key's stored limits (``None``: none set, or unknown)."""

    async def teams(self, limit: int, after: str | None = None) -> Sequence[TeamSummary]:
        """Up to ``limit`` teams that have keys, by team id, after ``after``."""

    async def team(self, team_id: str) -> TeamSummary | None:
        """One team: from its keys, or its limits alone; ``None`` when it has neither."""

    async def any_limits(self) -> bool:
        """Whether any team or key has a limit set."""

    async def spent(self, scope: str, ident: str, since: str | None) -> int:
        """Micro-dollars a team's or key's priced usage cost from the day ``since`` (``None``: ever),
        from the daily totals of the usage ledger."""

    async def record_usage(self, rows: Sequence[LedgerValues]) -> None:
        """Insert usage ledger rows and add them to the daily totals, in one transaction. A request
        id already recorded (a batch written again after its commit went unacknowledged) is skipped
        and adds nothing to the totals."""

    async def prune_usage(self, before: str) -> int:
        """Delete ledger rows from before ``before`` (a date or ``2026-11-01T00:00:00.000Z``); how
        many. The daily totals are kept."""

    async def usage_request(self, request_id: str) -> LedgerRow | None:
        """One request's ledger row, or ``None`` (unknown, or pruned)."""

    async def usage_report(
        self, start: str, end: str, group_by: Sequence[str], filters: Mapping[str, str]
    ) -> ReportRows:
        """Usage from ``start`` (included) to ``end`` (excluded), dates or ``…T12:00:00.000Z`` times,
        grouped by any of ``hour``, ``day``, ``team``, ``key``, ``provider``, ``model`` and filtered on
        ``team_id``, ``key_id``, ``provider``, ``model`` (anything else: ``ValueError``). Each row has
        its group fields (``hour``, ``day``, ``teamId``, ``keyId``, ``provider``, ``model``) and
        ``requests``, ``inputTokens``, ``outputTokens``, ``cacheReadTokens``, ``cacheWriteTokens``,
        ``reasoningTokens``, ``costMicroUsd`` (``None`` when no request of the row was priced) and
        ``unpricedRequests``. Whole days without ``hour`` are read from the daily totals, which
        outlive the ledger's retention; anything else from the ledger rows."""

    async def usage_failures(self, start: str, end: str) -> FailureRows:
        """Ledger rows from ``start`` to ``end`` (times as ``usage_report`` takes them) that failed
        (status 400 and over) or did not reach their end: ``(status, requests, incomplete)`` by status."""


def retention_start(retention_days: int, now: datetime | None = None) -> str:
    """The first time usage ledger rows are kept for: midnight UTC ``retention_days`` days before
    today (the ledger then always holds whole days)."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    return (today - timedelta(days=retention_days)).isoformat() + "T00:00:00.000Z"


async def prune_old_usage(store: TokenStore, retention_days: int) -> int:
    """Delete the usage ledger rows older than ``retention_days`` (``USAGE_RETENTION_DAYS``) whole
    UTC days; how many. The daily totals stay. Meant to be called about once a day."""
    return await store.prune_usage(retention_start(retention_days))
