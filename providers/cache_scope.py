"""Cloudflare's cache, per team: no team is ever served another team's cached answer.

Cloudflare keys its cache on the request, and every team's request carries the same provider key,
so with the team cache scope (``CACHE_SCOPE=team``) the gateway sets ``cf-aig-cache-key`` itself
when the client asks for caching, and ``cf-aig-skip-cache`` when it does not.
"""

from __future__ import annotations

import hashlib

from starlette.types import Scope

SKIP_CACHE = (b"cf-aig-skip-cache", b"true")


def team_cache_key(team_id: str, scope: Scope, client_key: bytes | None, body: bytes, query: bytes) -> str:
    """Cloudflare's cache key for a team: the team and the client's own key, or, without one, the
    team and the request itself (method, path, query, body), so teams never share cached answers."""
    digest = hashlib.sha256(team_id.encode() + b"\0")
    if client_key is not None:
        digest.update(b"key\0" + client_key)
    else:
        digest.update(b"\0".join((b"request", scope["method"].encode(), scope["raw_path"], query, body)))
    return digest.hexdigest()
