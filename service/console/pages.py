"""The console's pages: sign-in, overview, keys, teams, usage explorer, audit trail, status.

Plain HTML forms (they work without JavaScript); every change is a POST carrying the session's
CSRF token; a key is shown once, on the page that answers its creation or rotation, never again.
A team's limits and allow-lists, and a key's allow-lists, are set through the same checks and
writes as ``PATCH /teams/{teamId}`` and ``PATCH /keys/{keyId}`` (``service.teams_api``'s
``check_patch`` and ``apply_patch`` with its field tables), so the console refuses what the API
refuses, in its words, and records the same audit event.
Keys are issued, rotated and revoked through the token API's own functions (``service.tokens``):
the same checks of ``expiresIn``, ``allowedModels``, ``allowedProviders`` and ``graceSeconds``, and
the same audit records, with the actor ``admin-api`` (the console signs in with the admin key).
The audit page reads the trail through ``GET /audit``'s ``service.governance.audit_page``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from config import Settings
from config.settings import masked_userinfo
from service.console import data
from service.console.charts import MEASURES, stacked
from service.console.session import FAILURE_DELAY_SECONDS, Session, Sessions, SignInThrottle
from service.console.web import Handler, guarded, html, read_form, same_origin, static_files, templates
from service.core import audit
from service.core.errors import AuthenticationFailed, BadRequest, Conflict, Forbidden, GatewayError, NotFound
from service.core.limits.limiter import Limiter
from service.core.limits.model import MICRO, NO_LIMITS, PERIODS
from service.core.store import StoreUnavailableError
from service.core.teams import TeamDirectory
from service.fields import Change
from service.governance import AUDIT_FILTERS, audit_filters, audit_page
from service.teams_api import KEY_FIELDS, LIMIT_FIELDS, TEAM_FIELDS, Field, apply_patch, check_patch
from service.tokens import MAX_TEAM_ID, actor, check_text, grace_seconds, issue, new_key_fields
from service.usage import (
    FILTERS,
    build_report,
    check_filters,
    parse_group_by,
    parse_time,
    report_csv,
    time_range,
    timestamp,
)
from service.usage import GROUP_FIELDS as USAGE_GROUP_FIELDS

log = structlog.get_logger("gateway.console")

KEYS_PER_PAGE = 100
AUDIT_PER_PAGE = 50
AUDIT_FIELDS = ("teamId", "keyId", "action", "from", "to")
KEY_STATES = {"": "all keys", "expired": "expired", "idle": f"idle for {data.IDLE_DAYS} days"}


def version() -> str:
    try:
        return importlib.metadata.version("ai-gateway")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover (run from a source tree never installed)
        return "unknown"


class Console:
    """The admin console at ``/admin``, an ASGI app the ``Gateway`` dispatches ``/admin`` paths to."""

    def __init__(
        self, settings: Settings, upstreams: dict[str, str], known_providers: tuple[str, ...] | None = None
    ) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.known_providers = known_providers
        """Every provider slug the gateway knows (enabled or not), as ``POST /tokens`` checks them."""
        self.sessions = (
            Sessions(settings.admin_api_key, settings.console_session_secret, settings.trusted_proxies)
            if settings.admin_api_key
            else None
        )
        self.throttle = SignInThrottle()
        self.env = templates()
        self.env.filters["dollars"] = data.dollars
        self.static = static_files()
        self.version = version()
        self.audit_enabled = True
        page = self.page
        self.router = Router(
            routes=[
                Route("/admin", page(self.overview)),
                Route("/admin/login", guarded(self.sign_in, self.error_page), methods=["GET", "POST"]),
                Route("/admin/logout", page(self.sign_out), methods=["POST"]),
                Route("/admin/keys", page(self.keys), methods=["GET", "POST"]),
                Route("/admin/keys/{key_id}/rotate", page(self.rotate), methods=["GET", "POST"]),
                Route("/admin/keys/{key_id}/revoke", page(self.revoke), methods=["GET", "POST"]),
                Route("/admin/keys/{key_id}/allow-lists", page(self.key_allow_lists), methods=["GET", "POST"]),
                Route("/admin/teams", page(self.teams)),
                Route("/admin/teams/{team_id:path}", page(self.team), methods=["GET", "POST"]),
                Route("/admin/usage", page(self.usage)),
                Route("/admin/usage.csv", page(self.usage_csv)),
                Route("/admin/audit", page(self.audit)),
                Route("/admin/status", page(self.status)),
                Route("/admin/static/{name}", self.static_file),
                Route("/admin/{rest:path}", guarded(self.not_found, self.error_page), methods=["GET", "POST"]),
            ],
            redirect_slashes=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    # -- rendering ------------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
    ) -> Response:
        session: Session | None = request.scope.get("console.session")
        body = self.env.get_template(template).render(
            request_path=request.url.path,
            csrf_token=session.csrf_token if session else None,
            signed_in=session is not None,
            static={name: f"/admin/static/{name}?v={item.version}" for name, item in self.static.items()},
            version=self.version,
            audit_enabled=self.audit_enabled,
            **context,
        )
        return html(body, status, headers)

    def error_page(self, request: Request, error: GatewayError) -> Response:
        headers = {name.decode(): value.decode() for name, value in error.headers}
        return self.render(request, "error.html", error.status, headers, message=error.message, code=error.status)

    def page(self, handler: Handler) -> Handler:
        """A page behind the sign-in: without a session, GET goes to the sign-in page and a change is
        refused; a change (POST) also needs the session's CSRF token."""

        async def signed_in(request: Request) -> Response:
            session = self.sessions.current(request) if self.sessions else None
            if session is None:
                if request.method in ("GET", "HEAD"):
                    return RedirectResponse("/admin/login", status_code=303)
                raise Forbidden("Sign in to the console first.")
            if request.method == "POST":
                same_origin(request)
                form = await read_form(request)
                assert self.sessions is not None
                if not self.sessions.csrf_ok(session, form.get("csrf_token")):
                    log.warning("console_csrf_refused", path=request.url.path)
                    raise Forbidden("This form is missing its security token or it has expired: reload the page.")
                request.scope["console.form"] = form
            request.scope["console.session"] = session
            return await handler(request)

        return guarded(signed_in, self.error_page)

    async def not_found(self, request: Request) -> Response:
        raise NotFound("There is no such page in the console.")

    async def static_file(self, request: Request) -> Response:
        item = self.static.get(request.path_params["name"])
        if item is None:
            return self.error_page(request, NotFound("Not found"))
        cache = "public, max-age=31536000, immutable"
        return Response(item.body, media_type=item.media_type, headers={"cache-control": cache})

    # -- sign-in --------------------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        if self.sessions is None:
            raise Forbidden("The console is disabled until ADMIN_API_KEY is set on the gateway.")
        if request.method == "GET":
            if self.sessions.current(request) is not None:
                return RedirectResponse("/admin", status_code=303)
            return self.render(request, "login.html")
        same_origin(request)
        guard = request.state.guard
        address: str = guard.address(request.scope)
        retry_after = self.throttle.retry_after(address)
        if retry_after is not None:
            log.warning("console_sign_in_throttled", address=address, retry_after=retry_after)
            error = GatewayError(f"Too many failed sign-ins from your address: try again in {retry_after} s.")
            error.status = 429
            error.headers = ((b"retry-after", str(retry_after).encode()),)
            raise error
        form = await read_form(request)
        if not self.sessions.admin_key_matches(form.get("admin_key", "").strip()):
            self.throttle.failed(address)
            log.warning("console_sign_in_failed", address=address)
            await asyncio.sleep(FAILURE_DELAY_SECONDS)
            failure = AuthenticationFailed("That is not the admin key.")
            return self.render(request, "login.html", failure.status, error=failure.message)
        self.throttle.succeeded(address)
        log.info("console_sign_in", address=address)
        response = RedirectResponse("/admin", status_code=303)
        self.sessions.start(request, response)
        return response

    async def sign_out(self, request: Request) -> Response:
        response = RedirectResponse("/admin/login", status_code=303)
        assert self.sessions is not None
        self.sessions.end(request, response)
        return response

    # -- pages ----------------------------------------------------------------------------------

    @staticmethod
    def _teams(request: Request) -> TeamDirectory:
        teams: TeamDirectory = request.state.teams
        if teams.degraded:
            raise StoreUnavailableError("store unavailable")
        return teams

    @staticmethod
    def _limiter(request: Request) -> Limiter:
        limiter: Limiter = request.state.limiter
        return limiter

    async def _patch(
        self, request: Request, kind: str, ident: str, table: dict[str, Field], body: dict[str, Any]
    ) -> GatewayError | None:
        """A form's change, as the JSON body of ``PATCH /teams/{teamId}`` (or ``/keys/{keyId}``)
        through its checks and writes: one audit event, applied by this process at once and by the
        others on their key cache's refresh. The API's refusal, if it refused."""
        teams, change = self._teams(request), Change(known_providers=self.known_providers)
        try:
            applies = check_patch(body, table, change)
            await apply_patch(teams, self._limiter(request), kind, ident, change, applies, actor(request))
        except (BadRequest, Conflict) as error:
            return error
        log.info(f"console_{kind}_updated", **{f"{kind}_id": ident}, fields=sorted(body))
        return None

    async def overview(self, request: Request) -> Response:
        store = self._teams(request).store
        view = await data.overview(store, datetime.now(UTC))
        standings, _ = await data.team_standings(store, self._limiter(request))
        cost = MEASURES["cost"]
        return self.render(
            request,
            "overview.html",
            view=view,
            by_provider=stacked(
                "Cost by provider, last 30 days", view.by_provider, "day", "provider", cost, view.chart_days
            ),
            by_team=stacked("Cost by team, last 30 days", view.by_team, "day", "teamId", cost, view.chart_days),
            dollars=MEASURES["cost"].shown,
            nearest=data.nearest_budgets(standings),
        )

    async def keys(self, request: Request) -> Response:
        teams = self._teams(request)
        query = request.query_params
        team_filter = query.get("team") or None
        state = query.get("state", "")
        if state not in KEY_STATES:
            raise BadRequest(f"'state' must be one of: {', '.join(s for s in KEY_STATES if s)}.")
        page = data.whole_page(query.get("page", "1"))
        form_error = None
        status = 200
        if request.method == "POST":
            try:
                team_id, name, change = new_key_fields(
                    data.key_form(request.scope["console.form"]), self.known_providers
                )
            except BadRequest as error:
                form_error, status = error.message, 400
            else:
                key, team = await issue(teams, team_id, name, change, actor(request))
                log.info("console_key_created", key_id=team.key_id, team_id=team.team_id)
                return self.render(request, "key_secret.html", 201, action="created", key=key, team=team)
        if team_filter is not None:
            check_text(team_filter, "team", MAX_TEAM_ID)
        records, truncated = await data.scan_keys(teams.store, team_filter)
        now = datetime.now(UTC)
        views = [view for view in (data.key_view(r, now) for r in records) if not state or getattr(view, state)]
        start = (page - 1) * KEYS_PER_PAGE
        shown = views[start : start + KEYS_PER_PAGE]
        limits = [await teams.store.limits_of("key", view.record.key_id) for view in shown]
        all_teams = records if team_filter is None else (await data.scan_keys(teams.store))[0]
        return self.render(
            request,
            "keys.html",
            status,
            keys=shown,
            key_limits=[data.limits_text(item) for item in limits],
            total=len(views),
            page=page,
            pages=max(1, -(-len(views) // KEYS_PER_PAGE)),
            truncated=truncated,
            team_filter=team_filter or "",
            state=state,
            states=KEY_STATES,
            team_ids=sorted({r.team_id for r in all_teams}),
            form_error=form_error,
            form=request.scope.get("console.form", {}),
            notice=query.get("revoked"),
            saved=query.get("saved"),
            page_query=lambda n: urlencode({"team": team_filter or "", "state": state, "page": n}),
        )

    async def _record(self, request: Request) -> Any:
        record = await self._teams(request).find(request.path_params["key_id"])
        if record is None:
            raise NotFound("There is no key with this id (it may have been revoked).")
        return record

    async def rotate(self, request: Request) -> Response:
        record = await self._record(request)
        if request.method == "GET":
            return self.render(request, "confirm.html", action="rotate", record=record)
        raw = request.scope["console.form"].get("graceSeconds", "").strip()
        try:  # read as the JSON body of POST /tokens/{key}/refresh reads it, and checked there
            grace = grace_seconds({"graceSeconds": data.json_number(raw)} if raw else {})
        except BadRequest as error:
            return self.render(
                request, "confirm.html", 400, action="rotate", record=record, form_error=error.message, grace=raw
            )
        rotated = await self._teams(request).rotate_id(record.key_id, actor(request), grace)
        if rotated is None:
            raise NotFound("There is no key with this id (it may have been revoked).")
        key, team = rotated
        log.info("console_key_rotated", key_id=team.key_id, team_id=team.team_id, grace_seconds=grace)
        return self.render(request, "key_secret.html", action="rotated", key=key, team=team, grace=grace)

    async def revoke(self, request: Request) -> Response:
        record = await self._record(request)
        if request.method == "GET":
            return self.render(request, "confirm.html", action="revoke", record=record)
        if not await self._teams(request).revoke_id(record.key_id, actor(request)):
            raise NotFound("There is no key with this id (it may have been revoked).")
        log.info("console_key_revoked", key_id=record.key_id, team_id=record.team_id)
        return RedirectResponse("/admin/keys?" + urlencode({"revoked": record.key_id}), status_code=303)

    async def key_allow_lists(self, request: Request) -> Response:
        record = await self._record(request)
        values = data.allow_lists_values(record)
        error = None
        if request.method == "POST":
            form = request.scope["console.form"]
            error = await self._patch(request, "key", record.key_id, KEY_FIELDS, data.allow_lists_form(form))
            if error is None:
                query = urlencode({"team": record.team_id, "saved": record.key_id})
                return RedirectResponse(f"/admin/keys?{query}", status_code=303)
            values = {name: form.get(name, "") for name in data.ALLOW_LISTS}
        return self.render(
            request,
            "key_allow_lists.html",
            200 if error is None else error.status,
            record=record,
            values=values,
            form_error=None if error is None else error.message,
            providers=self.known_providers,
        )

    async def teams(self, request: Request) -> Response:
        store = self._teams(request).store
        records, truncated = await data.scan_keys(store)
        summaries = data.team_summaries(records)
        standings, _ = await data.team_standings(store, self._limiter(request))
        return self.render(
            request, "teams.html", teams=summaries, standings=standings, truncated=truncated, quote=quote
        )

    async def team(self, request: Request) -> Response:
        team_id = check_text(request.path_params["team_id"], "teamId", MAX_TEAM_ID)
        teams = self._teams(request)
        records, truncated = await data.scan_keys(teams.store, team_id)
        if not records:
            raise NotFound("This team has no keys.")
        form = request.scope.get("console.form", {})
        failed, error = None, None  # the form refused, and why
        if request.method == "POST":
            posted = form.get("form", "")
            read = data.TEAM_FORMS.get(posted)
            if read is None:
                raise BadRequest(f"'form' must be one of {', '.join(data.TEAM_FORMS)}.")
            error = await self._patch(request, "team", team_id, TEAM_FIELDS, read(form))
            if error is None:
                path = f"/admin/teams/{quote(team_id, safe='')}?{urlencode({'saved': posted})}"
                return RedirectResponse(path, status_code=303)
            failed = posted
        limits = await teams.store.limits_of("team", team_id)
        summary = await teams.store.team(team_id)
        standing = await data.standing(self._limiter(request), "team", team_id, limits)
        if failed == "limits":
            values = {name: form.get(name, "") for name in LIMIT_FIELDS}
        else:
            stored = (limits or NO_LIMITS).json()
            values = {name: "" if stored[name] is None else str(stored[name]) for name in stored}
            if limits is not None and limits.budget_micro_usd is not None:
                values["budgetUsd"] = f"{Decimal(limits.budget_micro_usd) / MICRO:f}"
        if failed == "allow-lists":
            allow_values = {name: form.get(name, "") for name in data.ALLOW_LISTS}
        else:
            allow_values = data.allow_lists_values(summary)
        now = datetime.now(UTC)
        today = now.date()
        first = today + timedelta(days=1) - timedelta(days=data.CHART_DAYS)
        window = (data.midnight(first), data.midnight(today + timedelta(days=1)))
        report = await build_report(teams.store, *window, ["day", "model"], {"team_id": team_id})
        chart = stacked(
            f"Cost of {team_id} by model, last 30 days",
            report["rows"],
            "day",
            "model",
            MEASURES["cost"],
            data.days(first, data.CHART_DAYS),
        )
        return self.render(
            request,
            "team.html",
            200 if error is None else error.status,
            team_id=team_id,
            team_allowed=None if summary is None else data.allowed(summary),
            allow_values=allow_values,
            providers=self.known_providers,
            standing=standing,
            values=values,
            periods=PERIODS,
            failed=failed,
            form_error=None if error is None else error.message,
            saved=request.method == "GET" and request.query_params.get("saved"),
            keys=[data.key_view(r, now) for r in records],
            truncated=truncated,
            chart=chart,
            totals=report["totals"],
            window=window,
            dollars=MEASURES["cost"].shown,
        )

    def _usage_query(self, request: Request) -> dict[str, Any]:
        """The usage explorer's form, read and checked as ``GET /usage`` checks its query."""
        query = request.query_params
        start, end = query.get("from") or None, query.get("to") or None
        group_by = parse_group_by(",".join(query.getlist("groupBy")) or None)
        filters_raw = {name: query.get(name) or None for name in FILTERS}
        filters = check_filters(filters_raw)
        measure = query.get("measure", "cost")
        if measure not in MEASURES:
            raise BadRequest(f"'measure' must be one of {', '.join(MEASURES)}.")
        window = time_range(
            None if start is None else parse_time(start, "from"), None if end is None else parse_time(end, "to")
        )
        return {
            "window": window,
            "group_by": group_by,
            "filters": filters,
            "values": {"from": start or "", "to": end or "", **{k: v or "" for k, v in filters_raw.items()}},
            "measure": measure,
        }

    async def usage(self, request: Request) -> Response:
        store = self._teams(request).store
        try:
            asked = self._usage_query(request)
        except BadRequest as error:
            return self.render(request, "usage.html", 400, error=error.message, **self._usage_form(request))
        start, end = asked["window"]
        report = await build_report(store, start, end, asked["group_by"], asked["filters"])
        group_by: list[str] = asked["group_by"]
        fields = [USAGE_GROUP_FIELDS[name] for name in group_by]
        x_field = next((USAGE_GROUP_FIELDS[name] for name in group_by if name in ("day", "hour")), None)
        series = next((field for field in fields if field != x_field), None)
        chart = stacked("Usage", report["rows"], x_field, series, MEASURES[asked["measure"]])
        return self.render(
            request,
            "usage.html",
            report=report,
            fields=fields,
            chart=chart,
            csv_query=request.url.query,
            **self._usage_form(request),
        )

    def _usage_form(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        return {
            "values": {name: query.get(name, "") for name in ("from", "to", *FILTERS)},
            "group_by_checked": set(query.getlist("groupBy")) or {"day"},
            "groups": list(USAGE_GROUP_FIELDS),
            "measure": query.get("measure", "cost"),
            "measures": MEASURES,
            "providers": sorted(self.upstreams),
        }

    async def usage_csv(self, request: Request) -> Response:
        asked = self._usage_query(request)
        store = self._teams(request).store
        start, end = asked["window"]
        report = await build_report(store, start, end, asked["group_by"], asked["filters"])
        name = f"usage-{start[:10]}-{end[:10]}.csv"
        return Response(
            report_csv(report),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def audit(self, request: Request) -> Response:
        """The audit trail, newest first, a page at a time: ``GET /audit`` as a page, with its checks."""
        query = request.query_params
        values = {name: query.get(name, "").strip() for name in AUDIT_FIELDS}
        context: dict[str, Any] = {
            "values": values,
            "actions": audit.ACTIONS,
            "events": [],
            "next_query": None,
            "first_query": None,
        }
        try:
            filters = audit_filters({name: values[name] or None for name in AUDIT_FILTERS})
            start = timestamp(parse_time(values["from"], "from")) if values["from"] else None
            end = timestamp(parse_time(values["to"], "to")) if values["to"] else None
            if start is not None and end is not None and start > end:
                raise BadRequest("'from' must not be after 'to'.")
            cursor = query.get("cursor") or None
            found = await audit_page(self._teams(request).store, AUDIT_PER_PAGE, cursor, filters, start, end)
        except BadRequest as error:
            return self.render(request, "audit.html", 400, error=error.message, **context)
        shown = {name: value for name, value in values.items() if value}
        next_cursor = found["nextCursor"]
        return self.render(
            request,
            "audit.html",
            **{
                **context,
                "events": found["events"],
                "next_query": urlencode({**shown, "cursor": next_cursor}) if next_cursor else None,
                "first_query": urlencode(shown) if cursor else None,
            },
        )

    async def status(self, request: Request) -> Response:
        settings = self.settings
        try:
            await request.state.store.ping()
            store_ok = True
        except StoreUnavailableError:
            store_ok = False
        database = (
            f"PostgreSQL {masked_userinfo(settings.database_dsn)}"
            if settings.database_dsn
            else f"SQLite {settings.database_path}"
        )
        return self.render(
            request,
            "status.html",
            upstreams=sorted(self.upstreams.items()),
            store_ok=store_ok,
            database=database,
            redis=data.redis_status(settings),
            settings=settings,
            cloudflare=masked_userinfo(settings.ai_gateway_url) if settings.ai_gateway_url else None,
        )
