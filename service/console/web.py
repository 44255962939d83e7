"""The console's plumbing: security headers on every answer, static files, forms, templates, and
the wrapper every page goes through (session, CSRF, errors shown as pages).

Every answer under ``/admin`` gets a strict Content-Security-Policy (scripts and styles only from
``/admin/static``, nothing inline, no framing), ``X-Frame-Options: DENY``, ``nosniff``, and, unless
it is a static file, ``Cache-Control: no-store`` (a page may show a key once; it must not be kept).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import BadRequest, Forbidden, GatewayError, PayloadTooLarge
from service.core.store import StoreUnavailableError
from service.tokens import whole_number

log = structlog.get_logger("gateway.console")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 32
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


class SecurityHeaders:
    """The console's security headers on every answer it gives (pages, errors, static files)."""

    def __init__(self, console: ASGIApp) -> None:
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.console(scope, receive, send_with_headers)


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    media_type: str
    version: str


def static_files() -> dict[str, StaticFile]:
    """The files under ``static/``, read once, each with a version (its digest) for its URL."""
    found: dict[str, StaticFile] = {}
    for item in resources.files("service.console").joinpath("static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in STATIC_TYPES:
            body = item.read_bytes()
            found[item.name] = StaticFile(body, STATIC_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])
    return found


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("service.console", "templates"),
        autoescape=select_autoescape(["html", "svg"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = lambda text: "" if not text else str(text)[:16].replace("T", " ")
    env.filters["number"] = lambda value: "" if value is None else f"{value:,}"
    return env


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body, bounded; the first value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise BadRequest("Send the form as application/x-www-form-urlencoded.")
    declared = whole_number(request.headers.get("content-length") or "")
    if declared is not None and declared > MAX_FORM_BYTES:
        raise PayloadTooLarge(f"Form bodies are limited to {MAX_FORM_BYTES} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"Form bodies are limited to {MAX_FORM_BYTES} bytes.")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The form could not be read.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def same_origin(request: Request) -> None:
    """Refuse a change a browser says came from another site (``Sec-Fetch-Site``)."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("This form did not come from the console.")


Handler = Callable[[Request], Awaitable[Response]]
ErrorPage = Callable[[Request, GatewayError], Response]


def guarded(handler: Handler, error_page: ErrorPage) -> Handler:
    """A page whose gateway errors (a bad field, an unknown key, the store down) are shown as pages."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as error:
            return error_page(request, error)
        except StoreUnavailableError:
            log.warning("console_store_unavailable", path=request.url.path)
            unavailable = GatewayError("The key store is unreachable; try again in a moment.")
            unavailable.status = 503
            return error_page(request, unavailable)

    return endpoint


def html(body: str, status: int = 200, headers: dict[str, Any] | None = None) -> Response:
    return HTMLResponse(body, status_code=status, headers=headers)
