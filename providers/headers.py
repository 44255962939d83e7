"""What crosses the gateway in headers and query strings, each way.

Up: no hop-by-hop header, no credential of any provider (the team key never leaves the gateway,
whichever header, cookie or query parameter it was put in), and of Cloudflare's ``cf-aig-*``
controls only those a team may set (caching, timeout, retries); logging, cost and attribution stay
the operator's. Down: the upstream's headers without hop-by-hop ones, event streams marked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

# Never forwarded up: hop-by-hop headers, the host, the team's credentials, and the headers the
# gateway sets itself.
_DROP_UP = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"authorization",
        b"x-api-key",
        b"cookie",
        b"cf-aig-authorization",
        b"cf-aig-metadata",
    }
)
# The Cloudflare AI Gateway request headers a team may set; every other ``cf-aig-*`` header
# (cf-aig-collect-log, cf-aig-collect-log-payload, cf-aig-custom-cost, cf-aig-event-id,
# cf-aig-log-id, cf-aig-dlp…, cf-aig-byok…, cf-aig-authorization; cf-aig-metadata is merged by the
# gateway) changes logging, cost or attribution and is the operator's. CF_AIG_ALLOWED_HEADERS adds
# names. From Cloudflare's documentation:
#   caching          https://developers.cloudflare.com/ai-gateway/features/caching/
#                    cf-aig-cache-ttl, cf-aig-skip-cache, cf-aig-cache-key (per team, see
#                    team_cache_key), and the older cf-cache-ttl / cf-skip-cache, which are not
#                    cf-aig-* and pass as any header
#   request handling https://developers.cloudflare.com/ai-gateway/configuration/request-handling/
#                    cf-aig-request-timeout, cf-aig-max-attempts, cf-aig-retry-delay, cf-aig-backoff
#   all headers      https://developers.cloudflare.com/ai-gateway/glossary/
TEAM_CF_AIG_HEADERS = frozenset(
    {
        "cf-aig-cache-ttl",
        "cf-aig-skip-cache",
        "cf-aig-cache-key",
        "cf-aig-request-timeout",
        "cf-aig-max-attempts",
        "cf-aig-retry-delay",
        "cf-aig-backoff",
    }
)
# A gateway key anywhere in a header value or query parameter: that header or parameter stays here.
GATEWAY_KEY = re.compile(rb"(?i)sk_[0-9a-f]{64}")
# Query strings worth a closer look: a ``key`` parameter (Google's API key), or something that could
# hold a gateway key (its underscore, or percent-encoding).
_SUSPECT_QUERY = re.compile(rb"(?i)key|_|%")
# Never passed back down: hop-by-hop headers (the server frames the response itself) and the
# upstream's Date (the server sends its own; a response has one).
_DROP_DOWN = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"te",
        b"date",
    }
)


class Outgoing:
    """The headers to send upstream, and what the relay needs to know about the request's own."""

    __slots__ = ("cache_key", "declared_length", "headers", "skips_cache", "wants_cache")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        """As received (bytes, never decoded), without ``content-length``: the connection pool frames the body."""
        self.declared_length: bytes | None = None
        self.cache_key: bytes | None = None
        """The client's ``cf-aig-cache-key`` (replaced by a per-team one under the team cache scope)."""
        self.wants_cache = False
        self.skips_cache = False


class HeaderPolicy:
    """One provider mount's header rules, precomputed once."""

    def __init__(
        self, credentials: Iterable[str], *, via_gateway: bool, allowed_cf_aig: Iterable[str], team_cache: bool
    ) -> None:
        drop = set(_DROP_UP) | {h.encode() for h in credentials}
        if team_cache:
            drop.add(b"cf-aig-cache-key")
        self.drop = frozenset(drop)
        # direct, no cf-aig-* header leaves the gateway
        allowed = TEAM_CF_AIG_HEADERS | set(allowed_cf_aig) if via_gateway else set()
        self.cf_aig_allowed = frozenset(h.encode() for h in allowed)

    def up(self, raw: list[tuple[bytes, bytes]]) -> Outgoing:
        out = Outgoing()
        headers = out.headers
        drop = self.drop
        cf_aig_allowed = self.cf_aig_allowed
        connection = None
        for name, value in raw:
            if name in drop:
                if name == b"cf-aig-cache-key":
                    out.cache_key = value
                    out.wants_cache = True
                elif name == b"connection":
                    connection = value
                continue
            if name.startswith(b"cf-aig-") and name not in cf_aig_allowed:
                continue
            # a team key pasted where it does not belong (find, not `in`: see paths.safe_rest)
            if value.find(b"_") >= 0 and GATEWAY_KEY.search(value):
                continue
            if name == b"content-length":
                out.declared_length = value
                continue
            if name == b"cf-aig-cache-ttl" or name == b"cf-cache-ttl":
                out.wants_cache = True
            elif name == b"cf-aig-skip-cache":
                out.skips_cache = True
            headers.append((name, value))
        if connection is not None:
            out.headers = _without_connection_options(headers, connection)
        return out


class Down(NamedTuple):
    headers: list[tuple[bytes, bytes]]
    stream: bool
    """The body is an event stream (sent chunked, so that one cut short can still end with an error event)."""
    content_type: bytes | None
    content_encoding: bytes | None
    """Both as the upstream sent them, for the usage reader (found in the same pass, not looked up again)."""


def down(raw: tuple[tuple[bytes, bytes], ...]) -> Down:
    """The upstream's response headers to pass on, and what the relay needs to know of them."""
    headers = []
    content_type = content_encoding = None
    for name, value in raw:
        lowered = name.lower()
        if lowered in _DROP_DOWN:
            continue
        if lowered == b"content-type":
            content_type = value
        elif lowered == b"content-encoding":
            content_encoding = value
        headers.append((name, value))
    stream = content_type is not None and content_type.startswith(b"text/event-stream")
    if stream:
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return Down(headers, stream, content_type, content_encoding)


def _without_connection_options(headers: list[tuple[bytes, bytes]], connection: bytes) -> list[tuple[bytes, bytes]]:
    """Drop the headers the client's ``Connection`` header names: they are for this hop only."""
    named = {token.strip().lower() for token in connection.split(b",")}
    named -= {b"keep-alive", b"close", b"upgrade", b""}
    return [(k, v) for k, v in headers if k not in named] if named else headers


def without_credentials(query: bytes) -> bytes:
    """The query string to forward: without ``key`` (Google's API key parameter, which the Gemini
    REST API reads) and without any parameter holding a gateway key, however it is encoded."""
    if not _SUSPECT_QUERY.search(query):
        return query
    kept = []
    for part in query.split(b"&"):
        decoded = unquote_to_bytes(part.replace(b"+", b" "))
        if decoded.partition(b"=")[0].strip().lower() == b"key" or GATEWAY_KEY.search(decoded):
            continue
        kept.append(part)
    return b"&".join(kept)
