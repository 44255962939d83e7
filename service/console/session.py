"""The console's sign-in: the admin key exchanged for a signed, expiring session cookie.

The cookie holds a random session id and a fingerprint of the admin key, signed with
``CONSOLE_SESSION_SECRET`` (or, unset, a key derived from the admin key) and timed: it is refused
after ``SESSION_SECONDS``, when the signature or the fingerprint does not match (the admin key
changed), and it never holds the admin key itself. Sessions are stateless, so every worker and
replica accepts them; signing out deletes the cookie.

Every change (a POST) carries a CSRF token derived from the session id; ``SignInThrottle`` slows
failed sign-ins down per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "gateway_console"
COOKIE_PATH = "/admin"
SESSION_SECONDS = 8 * 3600
CSRF_FIELD = "csrf_token"
FAILURE_DELAY_SECONDS = 1.0
"""Every failed sign-in is answered this much later."""
MAX_FAILURES = 10
"""Failed sign-ins per client address and window; past them, sign-in is refused until the window ends."""
FAILURE_WINDOW_SECONDS = 15 * 60
MAX_ADDRESSES = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    csrf_token: str


class Sessions:
    """Issue and check session cookies and their CSRF tokens."""

    def __init__(self, admin_key: str, secret: str | None, trusted_proxies: Sequence[str] = ()) -> None:
        key = secret or hmac.new(admin_key.encode(), b"gateway admin console session", hashlib.sha256).hexdigest()
        self._key = key.encode()
        self._serializer = URLSafeTimedSerializer(key, salt="gateway-console-session")
        self._fingerprint = hmac.new(self._key, admin_key.encode(), hashlib.sha256).hexdigest()[:32]
        self._admin_key = admin_key.encode()
        self._trusted = tuple(ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies)

    def admin_key_matches(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self._admin_key)

    def csrf_token(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()

    def current(self, request: Request) -> Session | None:
        """The request's session, or ``None`` when it has no valid one."""
        cookie = request.cookies.get(COOKIE)
        if not cookie or len(cookie) > 512:
            return None
        try:
            value = self._serializer.loads(cookie, max_age=SESSION_SECONDS)
        except BadSignature:  # a bad signature, or an expired one (SignatureExpired is a BadSignature)
            return None
        if not isinstance(value, dict) or not isinstance(value.get("sid"), str) or not isinstance(value.get("fp"), str):
            return None
        if not hmac.compare_digest(value["fp"], self._fingerprint):
            return None
        return Session(value["sid"], self.csrf_token(value["sid"]))

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(str(presented).encode(), session.csrf_token.encode())

    def start(self, request: Request, response: Response) -> None:
        """Sign the browser in: a new session id in a fresh cookie."""
        cookie = self._serializer.dumps({"sid": secrets.token_hex(16), "fp": self._fingerprint})
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            path=COOKIE_PATH,
            secure=self.https(request),
            httponly=True,
            samesite="strict",
        )

    def end(self, request: Request, response: Response) -> None:
        response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=self.https(request), httponly=True, samesite="strict")

    def https(self, request: Request) -> bool:
        """Served over HTTPS: directly, or behind one of ``TRUSTED_PROXIES`` saying so."""
        if request.url.scheme == "https":
            return True
        peer = request.client.host if request.client else ""
        try:
            trusted = any(ipaddress.ip_address(peer) in network for network in self._trusted)
        except ValueError:
            trusted = False
        forwarded = request.headers.get("x-forwarded-proto", "").split(",")[-1].strip().lower()
        return trusted and forwarded == "https"


class SignInThrottle:
    """Failed sign-ins per client address, in fixed windows: each failure is answered after
    ``FAILURE_DELAY_SECONDS``, and past ``MAX_FAILURES`` in a window the address is refused
    without its key being checked until the window ends. Kept per worker process."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_seconds: float = FAILURE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.clock = clock
        self._windows: dict[str, list[float]] = {}
        """Address → [window start, failures], oldest first."""

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until the address may try again, or ``None`` when it may now."""
        entry = self._windows.get(address)
        if entry is None or entry[1] < self.max_failures:
            return None
        left = entry[0] + self.window_seconds - self.clock()
        return int(left) + 1 if left > 0 else None

    def failed(self, address: str) -> None:
        now = self.clock()
        entry = self._windows.get(address)
        if entry is None or now - entry[0] >= self.window_seconds:
            self._windows.pop(address, None)
            while len(self._windows) >= MAX_ADDRESSES:
                del self._windows[next(iter(self._windows))]
            entry = self._windows[address] = [now, 0]
        entry[1] += 1

    def succeeded(self, address: str) -> None:
        self._windows.pop(address, None)
