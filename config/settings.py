"""Typed settings, built once from the environment and an optional ``.env`` file.

Nothing here runs at import time: ``Settings.from_env()`` is called by ``create_app`` (or a test),
so every app instance carries its own settings. A malformed value raises ``SettingsError`` whose
message names the variable, which start-up prints as one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from dotenv import dotenv_values
from yarl import URL

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SECRET_FIELDS = frozenset({"ai_gateway_token", "admin_api_key", "openai_api_key", "anthropic_api_key"})


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    ai_gateway_url: str | None = None
    ai_gateway_id: str | None = None
    ai_gateway_token: str | None = None
    admin_api_key: str | None = None
    database_path: Path = Path("data/gateway.db")
    upstream_timeout_seconds: float = 300.0
    max_request_bytes: int = 32 * 1024 * 1024
    openai_api_key: str | None = None
    anthropic_api_key: str | None = None
    log_level: str = "info"
    auth_cache_refresh_seconds: float = 0.25

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read settings: the process environment wins over the ``.env`` file."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            raw = values.get(name)
            if raw is None:
                return None
            raw = raw.strip()
            return raw or None

        return cls(
            ai_gateway_url=_gateway_url(get("AI_GATEWAY_URL")),
            ai_gateway_id=get("AI_GATEWAY_ID"),
            ai_gateway_token=get("AI_GATEWAY_TOKEN"),
            admin_api_key=get("ADMIN_API_KEY"),
            database_path=_database_path(get("DATABASE_URL") or "sqlite:///data/gateway.db"),
            upstream_timeout_seconds=_positive_float(
                "UPSTREAM_TIMEOUT_SECONDS", get("UPSTREAM_TIMEOUT_SECONDS"), 300.0
            ),
            max_request_bytes=_positive_int("MAX_REQUEST_BYTES", get("MAX_REQUEST_BYTES"), 32 * 1024 * 1024),
            openai_api_key=get("OPENAI_API_KEY"),
            anthropic_api_key=get("ANTHROPIC_API_KEY"),
            log_level=_log_level(get("LOG_LEVEL")),
        )

    def public_view(self) -> dict[str, object]:
        """The effective configuration for the start-up log line, secrets masked."""
        view: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS:
                value = "set" if value else "unset"
            elif isinstance(value, Path):
                value = str(value)
            view[field.name] = value
        return view


def _gateway_url(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        url = URL(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"AI_GATEWAY_URL is not a valid URL: {raw!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"AI_GATEWAY_URL must be an http(s) URL with a host, got {raw!r}")
    if url.query_string or url.fragment:
        raise SettingsError("AI_GATEWAY_URL must not carry a query string or fragment")
    return raw.rstrip("/")


def _database_path(raw: str) -> Path:
    prefix = "sqlite:///"
    if not raw.startswith(prefix) or len(raw) == len(prefix):
        raise SettingsError(
            f"DATABASE_URL must look like sqlite:///relative/path.db or sqlite:////abs/path.db, got {raw!r}"
        )
    return Path(raw[len(prefix) :])


def _positive_float(name: str, raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _positive_int(name: str, raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(f"{name} must be a positive whole number of bytes, got {raw!r}")
    return value


def _log_level(raw: str | None) -> str:
    level = (raw or "info").lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level
