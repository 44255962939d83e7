"""Team API keys: ``sk_`` + 64 lowercase hex, from ``secrets``; only their SHA-256 digest is stored.

Each key also has a key id, ``key_`` + 16 lowercase hex: random (never derived from the key), not
secret, and kept when the key is rotated, so an administrator can find and revoke a key whose secret
they do not hold.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk_"
KEY_ID_PREFIX = "key_"
_KEY_RE = re.compile(r"sk_[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"key_[0-9a-f]{16}")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def is_well_formed(key: str) -> bool:
    return len(key) == 67 and _KEY_RE.fullmatch(key) is not None


def is_key_id(value: str) -> bool:
    return len(value) == 20 and _KEY_ID_RE.fullmatch(value) is not None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown(key: str) -> str:
    """How a key may appear in a log line: its first 8 characters."""
    return key[:8] + "…" if len(key) > 8 else key
