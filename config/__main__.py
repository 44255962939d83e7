"""``python -m config``: validate the settings and the provider catalogue, building nothing; exit 3
with one line naming a malformed variable.

This entry point is the one place in ``config`` that reaches up (to ``providers``, for the
catalogue): the import contract in pyproject.toml names it as the exception.

A check of the settings alone, for a release step or a shell; the server runner
(``python -m service.server``, which the Procfile runs) makes the same check before it binds its port.
"""

from __future__ import annotations

import sys

from config.settings import Settings, SettingsError

try:
    settings = Settings.from_env()
    from providers.prices import load_prices
    from providers.upstream import enabled_upstreams

    enabled_upstreams(settings)  # the registry, PROVIDERS and every {SLUG}_BASE_URL
    load_prices(settings.prices_file)  # the price table and PRICES_FILE
except SettingsError as exc:
    print(f"configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
