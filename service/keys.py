"""Team API keys: ``sk_`` + 64 lowercase hex, from ``secrets``; only their SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk_"
_KEY_RE = re.compile(r"sk_[0-9a-f]{64}")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def is_well_formed(key: str) -> bool:
    return len(key) == 67 and _KEY_RE.fullmatch(key) is not None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown(key: str) -> str:
    """How a key may appear in a log line: its first 8 characters."""
    return key[:8] + "…" if len(key) > 8 else key
