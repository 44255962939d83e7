"""Limits and budgets, before anything goes upstream.

A request whose key and team carry no limits passes through at the cost of two attribute reads. A
limited one is admitted by the limiter (``scope["state"]["limiter"]``) against its team's and its
key's limits at once, or refused with a 429 naming the limit; with a tokens-per-minute limit or a
budget its body is read first (bounded by ``MAX_REQUEST_BYTES``) for the prompt estimate, the model
and its output maximum, then handed on whole. Admitted, the response carries the ``x-ratelimit-*``
headers of the tightest limit, and when the request ends, however it ends (answered, upstream error,
client gone, timeout, the gateway's own error, cancellation), its lease is released with the real
tokens and cost the relay read. The relay writes the headers (``RequestInfo.limit_headers``) in place
of any the upstream sent of the same kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.body import ClientLeft, whole_body
from service.core.errors import Forbidden
from service.core.limits.limiter import Limiter
from service.core.limits.outcome import Estimate, Subject
from service.core.request import SCOPE_KEY, RequestInfo
from service.core.store import Team

Estimator = Callable[[Scope, bytes], Estimate]


_READS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that name no model and generate nothing (listing models, reading a file or a batch): a
budget admits them at no cost; a request that writes and names no model cannot be priced."""


def unpriced(model: str | None, subject: Subject) -> Forbidden:
    named = f"The model '{model}' has no price" if model else "The request names no model, so it has no price"
    return Forbidden(
        f"{named}, and {subject.kind} '{subject.ident}' has a budget: it cannot be charged against it "
        "(BUDGET_UNPRICED=deny on this gateway)."
    )


class _Plan(NamedTuple):
    """What a key's limits (and its team's) ask of each of its requests, worked out once per key."""

    team: Team
    subjects: tuple[Subject, ...]
    budgeted: Subject | None
    """The first subject with a budget: the one named when the model has no price."""
    estimated: bool
    """Whether the body is read for the worst case (a budget or a tokens-per-minute limit)."""


_PLANS_KEPT = 10_000


class LimitsGate:
    def __init__(self, app: ASGIApp, *, estimate: Estimator, max_body: int, unpriced_allowed: bool) -> None:
        self.app = app
        self.estimate = estimate
        self.max_body = max_body
        self.unpriced_allowed = unpriced_allowed
        self._plans: dict[int, _Plan] = {}

    def _new_plan(self, team: Team) -> _Plan:
        """``team``'s plan, kept by the identity of the key cache's entry (a new entry, a new plan)."""
        subjects = []
        if team.team_limits is not None:
            subjects.append(Subject("team", team.team_id, team.team_limits))
        if team.key_limits is not None:
            subjects.append(Subject("key", team.key_id, team.key_limits))
        budgeted = next((s for s in subjects if s.limits.budget_micro_usd is not None), None)
        estimated = budgeted is not None or any(s.limits.tokens_per_minute is not None for s in subjects)
        if len(self._plans) >= _PLANS_KEPT:
            self._plans.clear()
        plan = self._plans[id(team)] = _Plan(team, tuple(subjects), budgeted, estimated)
        return plan

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: a request without limits costs no coroutine of this hop (``middleware.metadata``)
        info: RequestInfo = scope[SCOPE_KEY]
        team = info.team
        if team is None or (team.team_limits is None and team.key_limits is None):
            return self.app(scope, receive, send)
        return self.limited(scope, receive, send, info, team)

    async def limited(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo, team: Team) -> None:
        plan = self._plans.get(id(team))
        if plan is None or plan.team is not team:
            plan = self._new_plan(team)
        tokens = cost = 0
        if plan.estimated:
            try:
                body = await whole_body(info, scope, receive, self.max_body)
            except ClientLeft:
                return
            tokens, worst, model = self.estimate(scope, body)
            budgeted = plan.budgeted
            if budgeted is not None:
                if worst is None:
                    reads_only = model is None and scope["method"] in _READS
                    if not self.unpriced_allowed and not reads_only:
                        raise unpriced(model, budgeted)
                else:
                    cost = worst
        limiter: Limiter = scope["state"]["limiter"]
        grant = await limiter.admit(plan.subjects, tokens, cost, info.request_id)
        if grant.headers:
            info.limit_headers = grant.headers  # the relay answers with them
        try:
            await self.app(scope, receive, send)
        finally:
            limiter.release(grant, (info.input_tokens or 0) + (info.output_tokens or 0), info.cost_micro_usd or 0)
