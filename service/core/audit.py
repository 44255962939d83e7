"""The audit trail: who changed which key or team, when, and what changed.

``record(store, action, actor, …)`` is the one way in: it writes the event to the store's
``audit_log`` (never pruned: the usage retention deletes ledger rows only) and logs one ``audit``
line with the same fields. ``changes`` maps each field that changed to ``{"before", "after"}``;
callers put API field names and values there, never a secret (keys are identified by ``keyId``).

Actions: ``key.created``, ``key.rotated``, ``key.revoked``, ``key.expired``, ``key.updated``,
``team.updated``. Actors: ``admin-api`` (the admin bearer), ``cli`` (the ``gateway`` command),
``key`` (a key rotating itself), ``system`` (the gateway noticing an expiry by time).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from service.core.store.base import AuditEvent, TokenStore, utc_timestamp

log = structlog.get_logger("gateway.audit")

ACTIONS = ("key.created", "key.rotated", "key.revoked", "key.expired", "key.updated", "team.updated")
ACTORS = ("admin-api", "cli", "key", "system")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, and from where (the API's client address and request id)."""

    name: str
    client_address: str | None = None
    request_id: str | None = None


CLI = Actor("cli")
SYSTEM = Actor("system")


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields of ``after`` whose values differ from ``before``'s, as ``{field: {"before": …,
    "after": …}}`` (a field absent before was ``None``)."""
    return {
        name: {"before": before.get(name), "after": value} for name, value in after.items() if before.get(name) != value
    }


def new_event(
    action: str, actor: Actor, *, team_id: str | None, key_id: str | None, changes: Mapping[str, Any]
) -> AuditEvent:
    return AuditEvent(
        id="aud_" + secrets.token_hex(8),
        at=utc_timestamp(),
        action=action,
        actor=actor.name,
        team_id=team_id,
        key_id=key_id,
        changes=dict(changes),
        client_address=actor.client_address,
        request_id=actor.request_id,
    )


async def record_events(store: TokenStore, events: list[AuditEvent]) -> None:
    """Log each event and append them to the audit trail in one write."""
    if not events:
        return
    for event in events:
        log.info(
            "audit",
            audit_id=event.id,
            action=event.action,
            actor=event.actor,
            team_id=event.team_id,
            key_id=event.key_id,
            changes=event.changes,
            client=event.client_address,
            request_id=event.request_id,
        )
    await store.record_audit(events)


async def record(
    store: TokenStore,
    action: str,
    actor: Actor,
    *,
    team_id: str | None,
    key_id: str | None = None,
    changes: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Record one change (logged and stored); the event."""
    event = new_event(action, actor, team_id=team_id, key_id=key_id, changes=changes or {})
    await record_events(store, [event])
    return event


async def record_expiries(store: TokenStore) -> int:
    """Record ``key.expired`` once for each key whose expiry time has passed (whichever process
    gets there first); how many. Called every few seconds by each worker."""
    expired = await store.note_expired(utc_timestamp())
    events = [
        new_event(
            "key.expired",
            SYSTEM,
            team_id=team_id,
            key_id=key_id,
            changes={"expired": {"before": False, "after": True}},
        )
        for key_id, team_id, _ in expired
    ]
    await record_events(store, events)
    return len(events)
