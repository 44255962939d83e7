"""Keeping a client's path inside its provider's base.

The rest of the path is forwarded percent-encoded as the client sent it, after these checks: dot
segments (``..``, ``%2e%2e``, ``.``), encoded slashes or backslashes and control characters are
refused with 400; empty segments (``a//b``) are collapsed. No path can climb out of
``{AI_GATEWAY_URL}/{provider}/``.
"""

from __future__ import annotations

from urllib.parse import unquote

from service.core.errors import BadRequest

_FORBIDDEN_DECODED = ("/", "\\", "\x00")


def safe_rest(raw: bytes) -> str:
    """``raw`` is the raw path after the provider prefix (``b"/v1/chat/completions"`` or ``b""``)."""
    # bytes.find rather than `in`: on Python 3.11 `sub in raw` first tries ``sub`` as an integer and
    # formats the TypeError it gets (about 2k instructions each time)
    if raw.isascii() and raw.find(b"%") < 0 and raw.find(b"//") < 0 and raw.find(b"/.") < 0 and raw.find(b"\\") < 0:
        return raw[1:].decode("ascii")
    if not raw.isascii():
        raise BadRequest("The request path must be ASCII (percent-encode other characters).")
    text = raw.decode("ascii")
    segments = []
    for segment in text.split("/"):
        if not segment:
            continue
        decoded = unquote(segment) if "%" in segment else segment
        if decoded in (".", "..") or any(c in decoded for c in _FORBIDDEN_DECODED) or not decoded.isprintable():
            raise BadRequest("The request path contains a dot segment, an encoded slash or a control character.")
        segments.append(segment)
    rest = "/".join(segments)
    if text.endswith("/") and rest:
        rest += "/"
    return rest
