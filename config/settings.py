"""Typed settings, built once from the environment and an optional ``.env`` file.

Nothing here runs at import time: ``Settings.from_env()`` is called by ``create_app`` (or a test),
so every app instance carries its own settings. A malformed value raises ``SettingsError`` whose
message names the variable, which start-up prints as one line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values
from yarl import URL

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CACHE_SCOPES = ("team", "shared")
SECRET_FIELDS = frozenset({"ai_gateway_token", "admin_api_key", "metrics_token", "console_session_secret"})
PROVIDER_SUFFIXES = ("_API_KEY", "_BASE_URL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    ai_gateway_url: str | None = None
    ai_gateway_id: str | None = None
    ai_gateway_token: str | None = None
    admin_api_key: str | None = None
    database_path: Path | None = Path("data/gateway.db")
    """The SQLite file, or ``None`` when ``database_dsn`` names a PostgreSQL database."""
    database_dsn: str | None = None
    database_pool_size: int = 10
    store_outage_grace_seconds: float = 60.0
    upstream_timeout_seconds: float = 300.0
    max_request_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"
    auth_cache_refresh_seconds: float = 0.25
    providers: tuple[str, ...] | None = None
    """``PROVIDERS``: the slugs to mount; ``None`` mounts every registered provider."""
    providers_file: Path | None = None
    """``PROVIDERS_FILE``: a TOML file of extra providers, read beside the built-in catalogue."""
    prices_file: Path | None = None
    usage_metering: bool = True
    """``USAGE_METERING``: read each response's usage on the side and record it (``false``: no
    ledger rows, no token or cost figures; the bytes relayed are the same either way)."""
    metrics_team_labels: bool = False
    """``METRICS_TEAM_LABELS``: a ``team`` label on the token and cost metrics (one series per team)."""
    usage_stream_options: str = "inject"
    """``USAGE_STREAM_OPTIONS``: ``inject`` asks OpenAI-format streams for their usage when the
    client did not, and hides the extra chunk from it; ``off`` leaves such streams unmetered."""
    """``PRICES_FILE``: a TOML file of model prices adding to or overriding the shipped table."""
    cache_scope: str = "team"
    metrics_port: int | None = None
    """``METRICS_PORT``: serve /metrics on this port only, not on the public one."""
    metrics_token: str | None = None
    """``METRICS_TOKEN``: the bearer /metrics needs on the public port (else the admin key)."""
    cors_allow_origins: tuple[str, ...] = ()
    """``CORS_ALLOW_ORIGINS``: browser origins allowed to call the gateway (``*`` for any); empty: CORS off."""
    shutdown_grace_seconds: int = 30
    stream_idle_timeout_seconds: float | None = None
    """``STREAM_IDLE_TIMEOUT_SECONDS``: end an event stream whose upstream sends nothing this long
    (``None``: streams may idle as long as the upstream keeps the connection)."""
    cf_aig_allowed_headers: tuple[str, ...] = ()
    """``CF_AIG_ALLOWED_HEADERS``: ``cf-aig-*`` headers teams may set beyond the built-in list."""
    host: str = "127.0.0.1"
    """``HOST``: the address the server listens on (the Procfile passes 0.0.0.0)."""
    port: int = 8787
    web_concurrency: int = 1
    """``WEB_CONCURRENCY``: worker processes."""
    max_header_bytes: int = 64 * 1024
    """``MAX_HEADER_BYTES``: request line and headers together; more → 431."""
    max_header_line_bytes: int = 16 * 1024
    """``MAX_HEADER_LINE_BYTES``: one header line, or the request line's URL; more → 431."""
    header_read_timeout_seconds: float = 10.0
    """``HEADER_READ_TIMEOUT_SECONDS``: time for a whole request head to arrive."""
    max_connections: int = 10_000
    """``MAX_CONNECTIONS``: open client connections per worker; more are refused."""
    cf_account_id: str | None = None
    self_service_rotation: bool = True
    """``SELF_SERVICE_ROTATION``: a key alone may rotate itself (the original Worker); ``False``
    requires the admin bearer for ``POST /tokens/{apiKey}/refresh``."""
    unknown_key_limit: int = 30
    """``UNKNOWN_KEY_LIMIT``: unknown-key attempts per minute per client address before its
    not-known-valid keys get 429; 0 disables."""
    trusted_proxies: tuple[str, ...] = ()
    """``TRUSTED_PROXIES``: IPs and CIDRs (normalised) whose ``X-Forwarded-For`` names the client."""
    usage_retention_days: int = 90
    """``USAGE_RETENTION_DAYS``: whole days of usage ledger rows kept (1 to 3650); the daily totals stay."""
    redis_url: str | None = None
    """``REDIS_URL``: where limits and budget leases are kept for every worker and replica (``None``:
    in this process's memory, which one worker alone may use)."""
    redis_key_prefix: str = "gateway:"
    """``REDIS_KEY_PREFIX``: the start of every Redis key the gateway writes."""
    limits_fail_mode: str = "open"
    """``LIMITS_FAIL_MODE``: with Redis unreachable, requests under limits pass (``open``) or get 503 (``closed``)."""
    budget_unpriced: str = "deny"
    """``BUDGET_UNPRICED``: a model without a price is refused under a budget (``deny``) or admitted (``allow``)."""
    budget_default_max_tokens: int = 4096
    """``BUDGET_DEFAULT_MAX_TOKENS``: the output tokens a budget reserves for a request that sets no maximum."""
    limits_lease_seconds: float = 60.0
    """``LIMITS_LEASE_SECONDS``: how long a request's lease lives unless its process renews it (a
    process that died frees its leases after this long)."""
    admin_console: bool = True
    """``ADMIN_CONSOLE``: serve the admin console at ``/admin`` (``False``: no such path)."""
    console_session_secret: str | None = None
    """``CONSOLE_SESSION_SECRET``: signs the console's session cookies; unset, a key derived from
    the admin key (so changing the admin key signs every session out)."""
    provider_env: Mapping[str, str] = field(default_factory=dict)
    """Every ``{SLUG}_API_KEY`` and ``{SLUG}_BASE_URL`` set, by variable name (checked when the
    providers are mounted, since only then is it known which slugs exist)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
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

        database_url = get("DATABASE_URL") or "sqlite:///data/gateway.db"
        max_header_bytes, max_header_line_bytes = _header_limits(get("MAX_HEADER_BYTES"), get("MAX_HEADER_LINE_BYTES"))
        return cls(
            ai_gateway_url=_gateway_url(get("AI_GATEWAY_URL")),
            ai_gateway_id=get("AI_GATEWAY_ID"),
            ai_gateway_token=get("AI_GATEWAY_TOKEN"),
            admin_api_key=get("ADMIN_API_KEY"),
            database_path=_database_path(database_url),
            database_dsn=_database_dsn(database_url),
            database_pool_size=_positive_int("DATABASE_POOL_SIZE", get("DATABASE_POOL_SIZE"), 10, "connections"),
            store_outage_grace_seconds=_positive_float(
                "STORE_OUTAGE_GRACE_SECONDS", get("STORE_OUTAGE_GRACE_SECONDS"), 60.0
            ),
            upstream_timeout_seconds=_positive_float(
                "UPSTREAM_TIMEOUT_SECONDS", get("UPSTREAM_TIMEOUT_SECONDS"), 300.0
            ),
            max_request_bytes=_positive_int("MAX_REQUEST_BYTES", get("MAX_REQUEST_BYTES"), 32 * 1024 * 1024),
            log_level=_log_level(get("LOG_LEVEL")),
            providers=_providers(get("PROVIDERS")),
            providers_file=Path(raw_file) if (raw_file := get("PROVIDERS_FILE")) else None,
            prices_file=Path(raw_prices) if (raw_prices := get("PRICES_FILE")) else None,
            usage_metering=_boolean("USAGE_METERING", get("USAGE_METERING"), True),
            metrics_team_labels=_boolean("METRICS_TEAM_LABELS", get("METRICS_TEAM_LABELS"), False),
            usage_stream_options=_choice("USAGE_STREAM_OPTIONS", get("USAGE_STREAM_OPTIONS"), ("inject", "off")),
            cache_scope=_choice("CACHE_SCOPE", get("CACHE_SCOPE"), CACHE_SCOPES),
            cf_account_id=get("CF_ACCOUNT_ID"),
            metrics_port=_port("METRICS_PORT", get("METRICS_PORT")),
            metrics_token=get("METRICS_TOKEN"),
            cors_allow_origins=_origins(get("CORS_ALLOW_ORIGINS")),
            shutdown_grace_seconds=_positive_int(
                "SHUTDOWN_GRACE_SECONDS", get("SHUTDOWN_GRACE_SECONDS"), 30, "seconds"
            ),
            stream_idle_timeout_seconds=_seconds("STREAM_IDLE_TIMEOUT_SECONDS", get("STREAM_IDLE_TIMEOUT_SECONDS")),
            cf_aig_allowed_headers=_cf_aig_headers(get("CF_AIG_ALLOWED_HEADERS")),
            self_service_rotation=_boolean("SELF_SERVICE_ROTATION", get("SELF_SERVICE_ROTATION"), True),
            unknown_key_limit=_count("UNKNOWN_KEY_LIMIT", get("UNKNOWN_KEY_LIMIT"), 30),
            trusted_proxies=_networks("TRUSTED_PROXIES", get("TRUSTED_PROXIES")),
            usage_retention_days=_days("USAGE_RETENTION_DAYS", get("USAGE_RETENTION_DAYS"), 90, 3650),
            redis_url=_redis_url(get("REDIS_URL")),
            redis_key_prefix=_key_prefix(get("REDIS_KEY_PREFIX")),
            limits_fail_mode=_choice("LIMITS_FAIL_MODE", get("LIMITS_FAIL_MODE"), ("open", "closed")),
            budget_unpriced=_choice("BUDGET_UNPRICED", get("BUDGET_UNPRICED"), ("deny", "allow")),
            budget_default_max_tokens=_days(
                "BUDGET_DEFAULT_MAX_TOKENS", get("BUDGET_DEFAULT_MAX_TOKENS"), 4096, 10_000_000, "tokens"
            ),
            limits_lease_seconds=_positive_float("LIMITS_LEASE_SECONDS", get("LIMITS_LEASE_SECONDS"), 60.0),
            admin_console=_boolean("ADMIN_CONSOLE", get("ADMIN_CONSOLE"), True),
            console_session_secret=_session_secret(get("CONSOLE_SESSION_SECRET")),
            host=get("HOST") or "127.0.0.1",
            port=_listen_port("PORT", get("PORT"), 8787),
            web_concurrency=_whole_number("WEB_CONCURRENCY", get("WEB_CONCURRENCY"), 1, "processes"),
            max_header_bytes=max_header_bytes,
            max_header_line_bytes=max_header_line_bytes,
            header_read_timeout_seconds=_positive_float(
                "HEADER_READ_TIMEOUT_SECONDS", get("HEADER_READ_TIMEOUT_SECONDS"), 10.0
            ),
            max_connections=_whole_number("MAX_CONNECTIONS", get("MAX_CONNECTIONS"), 10_000, "connections"),
            provider_env=_provider_env(values),
        )

    def public_view(self) -> dict[str, object]:
        """The effective configuration for the start-up log line, secrets masked."""
        view: dict[str, object] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in SECRET_FIELDS:
                value = "set" if value else "unset"
            elif item.name == "provider_env":
                value = {k: ("set" if k.endswith("_API_KEY") else masked_userinfo(v)) for k, v in sorted(value.items())}
            elif item.name == "redis_url" and value:
                value = _masked_url(value)
            elif item.name in ("database_dsn", "ai_gateway_url") and value:
                value = _masked_url(value) if item.name == "database_dsn" else masked_userinfo(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Path):
                value = str(value)
            view[item.name] = value
        return view


def env_name(slug: str, suffix: str) -> str:
    """The setting for a provider slug: ``google-ai-studio`` + ``API_KEY`` → ``GOOGLE_AI_STUDIO_API_KEY``."""
    return f"{slug.upper().replace('-', '_')}_{suffix}"


def _gateway_url(raw: str | None) -> str | None:
    return None if raw is None else http_url("AI_GATEWAY_URL", raw)


def _provider_env(values: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, raw in values.items():
        value = raw.strip()
        if value and name.endswith(PROVIDER_SUFFIXES) and name != "ADMIN_API_KEY":
            found[name] = value
    return found


def _providers(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    slugs = tuple(dict.fromkeys(part.strip().lower() for part in raw.split(",") if part.strip()))
    if not slugs:
        raise SettingsError("PROVIDERS must name at least one provider, e.g. PROVIDERS=openai,anthropic")
    return slugs


def _origins(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    origins = tuple(dict.fromkeys(part.strip().rstrip("/") for part in raw.split(",") if part.strip()))
    for origin in origins:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("//", 1)[1]):
            raise SettingsError(
                f"CORS_ALLOW_ORIGINS must be '*' or origins like https://app.example.com, got {origin!r}"
            )
    return origins


def _port(name: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise SettingsError(f"{name} must be a port number from 1 to 65535, got {raw!r}")
    return int(raw)


def _choice(name: str, raw: str | None, allowed: tuple[str, ...]) -> str:
    value = (raw or allowed[0]).lower()
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*@")


def masked_userinfo(raw: str) -> str:
    """A URL with any ``user:password@`` replaced, for messages and logs (works on unparseable URLs too)."""
    match = _USERINFO.match(raw)
    return raw if match is None else f"{match.group(1) or ''}//***@{raw[match.end() :]}"


def http_url(name: str, raw: str) -> str:
    """``raw`` as an http(s) base URL without a trailing slash; a ``SettingsError`` naming ``name`` if not.

    Credentials in the URL (``http://user:password@host``) are refused: they would be logged with the
    configuration and sent in a form the gateway does not manage; messages never echo them."""
    shown = masked_userinfo(raw)
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} is not a valid URL: {shown if '@' not in shown else 'unparseable'!r}") from None
    if url.user is not None or url.password is not None:
        raise SettingsError(f"{name} must not carry credentials (user:password@host), got {shown!r}")
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"{name} must be an http(s) URL with a host, got {raw!r}")
    if url.query_string or url.fragment:
        raise SettingsError(f"{name} must not carry a query string or fragment")
    return raw.rstrip("/")


_DATABASE_URL_FORMS = (
    "sqlite:///relative/path.db, sqlite:////abs/path.db or postgresql://user:password@host:5432/database"
)


def _database_path(raw: str) -> Path | None:
    prefix = "sqlite:///"
    if raw.startswith(("postgresql://", "postgres://")):
        return None
    if not raw.startswith(prefix) or len(raw) == len(prefix):
        raise SettingsError(f"DATABASE_URL must look like {_DATABASE_URL_FORMS}, got {_masked_url(raw)!r}")
    return Path(raw[len(prefix) :])


def _database_dsn(raw: str) -> str | None:
    if not raw.startswith(("postgresql://", "postgres://")):
        return None
    try:
        url = URL(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"DATABASE_URL is not a valid URL: {_masked_url(raw)!r}") from exc
    if not url.host or not url.path.strip("/"):
        raise SettingsError(f"DATABASE_URL must name a host and a database, like {_DATABASE_URL_FORMS}")
    return raw


def _masked_url(raw: str) -> str:
    """A database URL with its password replaced, for messages and logs."""
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        return "<unparseable>"
    return str(url.with_password("***")) if url.password else raw


_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
_HEADER_NAME = re.compile(r"cf-aig-[a-z0-9-]+")
# set by the gateway itself on every call through Cloudflare; a team never may
_GATEWAY_SET = frozenset({"cf-aig-authorization", "cf-aig-metadata"})


def _seconds(name: str, raw: str | None) -> float | None:
    """An optional positive number of seconds in plain ASCII digits (``30``, ``2.5``)."""
    if raw is None:
        return None
    if not _SECONDS.fullmatch(raw) or float(raw) <= 0:
        raise SettingsError(f"{name} must be a positive number of seconds like 30 or 2.5, got {raw!r}")
    return float(raw)


def _cf_aig_headers(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    names = sorted({part.strip().lower() for part in raw.split(",") if part.strip()})
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise SettingsError(f"CF_AIG_ALLOWED_HEADERS must list cf-aig-* header names, got {name!r}")
        if name in _GATEWAY_SET:
            raise SettingsError(f"CF_AIG_ALLOWED_HEADERS cannot allow {name}: the gateway sets it itself")
    return tuple(names)


def _positive_float(name: str, raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw) if raw.isascii() else float("nan")  # float() reads '٣' too
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _positive_int(name: str, raw: str | None, default: int, unit: str = "bytes") -> int:
    if raw is None:
        return default
    digits = raw.replace("_", "")
    value = int(digits) if digits.isascii() and digits.isdigit() else 0
    if value <= 0:
        raise SettingsError(f"{name} must be a positive whole number of {unit}, got {raw!r}")
    return value


def _whole_number(name: str, raw: str | None, default: int, unit: str, minimum: int = 1) -> int:
    """A whole number written in ASCII digits only (``str.isdigit`` alone accepts '²' and '٣')."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum:
        raise SettingsError(f"{name} must be a whole number of {unit} from {minimum}, got {raw!r}")
    return int(raw)


def _days(name: str, raw: str | None, default: int, maximum: int, unit: str = "days") -> int:
    """A whole number of days (or ``unit``) from 1 to ``maximum``, in ASCII digits only."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= maximum:
        raise SettingsError(f"{name} must be a whole number of {unit} from 1 to {maximum}, got {raw!r}")
    return int(raw)


def _redis_url(raw: str | None) -> str | None:
    """``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://``; the password never echoed."""
    if raw is None:
        return None
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        raise SettingsError("REDIS_URL is not a valid URL") from None
    if url.scheme not in ("redis", "rediss", "unix") or (url.scheme != "unix" and not url.host):
        raise SettingsError(f"REDIS_URL must look like redis://host:6379/0, got {_masked_url(raw)!r}")
    return raw


_KEY_PREFIX = re.compile(r"[A-Za-z0-9:_.\-]{1,64}")


def _key_prefix(raw: str | None) -> str:
    if raw is None:
        return "gateway:"
    if not _KEY_PREFIX.fullmatch(raw):
        raise SettingsError(f"REDIS_KEY_PREFIX must be 1-64 letters, digits or ':_.-', got {raw!r}")
    return raw


def _listen_port(name: str, raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise SettingsError(f"{name} must be a port number from 1 to 65535, got {raw!r}")
    return int(raw)


MIN_HEADER_BYTES = 1024


def _header_limits(total_raw: str | None, line_raw: str | None) -> tuple[int, int]:
    total = _whole_number("MAX_HEADER_BYTES", total_raw, 64 * 1024, "bytes", MIN_HEADER_BYTES)
    # unset, the line limit follows a smaller total down; set, it must fit inside the total
    line = _whole_number("MAX_HEADER_LINE_BYTES", line_raw, min(16 * 1024, total), "bytes", MIN_HEADER_BYTES)
    if line > total:
        raise SettingsError(f"MAX_HEADER_LINE_BYTES ({line}) must not exceed MAX_HEADER_BYTES ({total})")
    return total, line


def _log_level(raw: str | None) -> str:
    level = (raw or "info").lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def _boolean(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    value = raw.lower()
    if value not in ("true", "false"):
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return value == "true"


MIN_SESSION_SECRET = 32


def _session_secret(raw: str | None) -> str | None:
    if raw is not None and len(raw) < MIN_SESSION_SECRET:
        raise SettingsError(f"CONSOLE_SESSION_SECRET must be at least {MIN_SESSION_SECRET} characters long")
    return raw


def _count(name: str, raw: str | None, default: int) -> int:
    """A whole number of ASCII digits, 0 included."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise SettingsError(f"{name} must be a whole number (0 disables), got {raw!r}")
    return int(raw)


def _networks(name: str, raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    found: list[str] = []
    for part in raw.split(","):
        text = part.strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise SettingsError(f"{name} must be comma-separated IP addresses or CIDRs, got {text!r}") from None
        found.append(str(network))
    return tuple(dict.fromkeys(found))
