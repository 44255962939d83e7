"""``python -m config``: validate the settings and exit 3 with one line naming a malformed variable.

The Procfile runs it before uvicorn so that a bad setting stops a multi-worker start with a
failing exit code in the parent process, not only in its workers.
"""

import sys

from config.settings import Settings, SettingsError

try:
    settings = Settings.from_env()
    # the provider registry and every {SLUG}_BASE_URL are checked as the gateway's start-up would
    from providers.mount import mount_providers

    mount_providers(settings)
except SettingsError as exc:
    print(f"configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
