"""``python -m config``: validate the settings and exit 3 with one line naming a malformed variable.

A check of the settings alone, for a release step or a shell; the server runner
(``python -m service.server``, which the Procfile runs) makes the same check before it binds its port.
"""

from __future__ import annotations

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
