"""Settings: read once from the environment and .env; malformed values stop start-up with one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from config import Settings, SettingsError
from tests.support import BIN, free_port, procfile_command


def test_defaults() -> None:
    settings = Settings.from_env({}, env_file=None)
    assert settings.ai_gateway_url is None
    assert settings.database_path == Path("data/gateway.db")
    assert settings.upstream_timeout_seconds == 300
    assert settings.max_request_bytes == 32 * 1024 * 1024
    assert settings.log_level == "info"


def test_values_and_database_urls() -> None:
    settings = Settings.from_env(
        {
            "AI_GATEWAY_URL": "https://gateway.ai.cloudflare.com/v1/acc/gw/",
            "DATABASE_URL": "sqlite:////abs/x.db",
            "UPSTREAM_TIMEOUT_SECONDS": "2.5",
            "MAX_REQUEST_BYTES": "1000",
            "LOG_LEVEL": "DEBUG",
        },
        env_file=None,
    )
    assert settings.ai_gateway_url == "https://gateway.ai.cloudflare.com/v1/acc/gw"
    assert settings.database_path == Path("/abs/x.db")
    assert (settings.upstream_timeout_seconds, settings.max_request_bytes, settings.log_level) == (
        2.5,
        1000,
        "debug",
    )
    assert Settings.from_env({"DATABASE_URL": "sqlite:///rel/y.db"}, env_file=None).database_path == Path("rel/y.db")
    pg = Settings.from_env(
        {"DATABASE_URL": "postgresql://u:pw@db:5432/gw", "DATABASE_POOL_SIZE": "4", "STORE_OUTAGE_GRACE_SECONDS": "30"},
        env_file=None,
    )
    assert (pg.database_path, pg.database_dsn, pg.database_pool_size) == (None, "postgresql://u:pw@db:5432/gw", 4)
    assert pg.store_outage_grace_seconds == 30
    assert "pw" not in str(pg.public_view()) and pg.public_view()["database_dsn"] == "postgresql://u:***@db:5432/gw"


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("AI_GATEWAY_ID=from-file\nADMIN_API_KEY=file-admin\n")
    settings = Settings.from_env({"ADMIN_API_KEY": "env-admin"}, env_file=env_file)
    assert settings.ai_gateway_id == "from-file" and settings.admin_api_key == "env-admin"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AI_GATEWAY_URL", "not a url"),
        ("AI_GATEWAY_URL", "ftp://x/y"),
        ("DATABASE_URL", "mysql://x"),
        ("DATABASE_URL", "sqlite:///"),
        ("DATABASE_URL", "postgresql://db"),
        ("DATABASE_POOL_SIZE", "0"),
        ("STORE_OUTAGE_GRACE_SECONDS", "-5"),
        ("CACHE_SCOPE", "everyone"),
        ("PROVIDERS", " , "),
        ("UPSTREAM_TIMEOUT_SECONDS", "abc"),
        ("UPSTREAM_TIMEOUT_SECONDS", "-1"),
        ("UPSTREAM_TIMEOUT_SECONDS", "nan"),
        ("MAX_REQUEST_BYTES", "0"),
        ("MAX_REQUEST_BYTES", "1.5"),
        ("LOG_LEVEL", "loud"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://"),
        ("REDIS_URL", "redis://:pw@[::1"),
        ("REDIS_KEY_PREFIX", "has space"),
        ("LIMITS_FAIL_MODE", "sometimes"),
        ("BUDGET_UNPRICED", "maybe"),
        ("BUDGET_DEFAULT_MAX_TOKENS", "0"),
        ("LIMITS_LEASE_SECONDS", "0"),
        ("ADMIN_CONSOLE", "maybe"),
        ("CONSOLE_SESSION_SECRET", "too-short"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value}, env_file=None)


def test_limit_settings() -> None:
    defaults = Settings.from_env({}, env_file=None)
    assert (defaults.redis_url, defaults.redis_key_prefix, defaults.limits_fail_mode) == (None, "gateway:", "open")
    assert (defaults.budget_unpriced, defaults.budget_default_max_tokens, defaults.limits_lease_seconds) == (
        "deny",
        4096,
        60.0,
    )
    env = {
        "REDIS_URL": "redis://:s3cret@cache.internal:6380/2",
        "REDIS_KEY_PREFIX": "gw-eu:",
        "LIMITS_FAIL_MODE": "closed",
        "BUDGET_UNPRICED": "allow",
        "BUDGET_DEFAULT_MAX_TOKENS": "1024",
        "LIMITS_LEASE_SECONDS": "5",
    }
    settings = Settings.from_env(env, env_file=None)
    assert settings.redis_url == env["REDIS_URL"] and settings.limits_fail_mode == "closed"
    assert settings.budget_default_max_tokens == 1024 and settings.limits_lease_seconds == 5
    assert "s3cret" not in str(settings.public_view())
    with pytest.raises(SettingsError) as malformed:
        Settings.from_env({"REDIS_URL": "ftp://:s3cret@host"}, env_file=None)
    assert "s3cret" not in str(malformed.value)


def test_public_view_masks_secrets() -> None:
    env = {
        "ADMIN_API_KEY": "a-secret",
        "AI_GATEWAY_TOKEN": "t-secret",
        "GROQ_API_KEY": "g-secret",
        "GROQ_BASE_URL": "https://groq.example/v1",
        "CONSOLE_SESSION_SECRET": "c-secret-" + "0" * 32,
    }
    view = Settings.from_env(env, env_file=None).public_view()
    assert view["console_session_secret"] == "set" and "c-secret" not in str(view)
    assert view["admin_api_key"] == "set" and view["ai_gateway_token"] == "set"
    assert view["provider_env"] == {"GROQ_API_KEY": "set", "GROQ_BASE_URL": "https://groq.example/v1"}
    assert "a-secret" not in str(view) and "t-secret" not in str(view) and "g-secret" not in str(view)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_malformed_setting_stops_the_procfile_command_with_one_line(tmp_path: Path, workers: str) -> None:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": workers,
        "UPSTREAM_TIMEOUT_SECONDS": "soon",
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
    }
    result = subprocess.run(["sh", "-c", procfile_command()], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.decode().splitlines() if "UPSTREAM_TIMEOUT_SECONDS" in line]
    assert errors and "Traceback" not in result.stderr.decode()
    assert errors[0].startswith("configuration error: UPSTREAM_TIMEOUT_SECONDS")


@pytest.mark.parametrize(
    "name", ["MAX_REQUEST_BYTES", "UPSTREAM_TIMEOUT_SECONDS", "METRICS_PORT", "DATABASE_POOL_SIZE", "UNKNOWN_KEY_LIMIT"]
)
@pytest.mark.parametrize("raw", ["²", "٣", "\uff11\uff10"])  # superscript, Arabic-Indic, fullwidth
def test_numbers_are_ascii_digits_only(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: raw}, env_file=None)
