"""``python -m config``: validate the settings and the provider catalogue, building nothing; exit 3
with one line naming a malformed variable.

This entry point is the one place in ``config`` that reaches up (to ``providers``, for the
catalogue): the import contract in pyproject.toml names it as the exception.
"""

import sys

from config.settings import Settings, SettingsError

try:
    settings = Settings.from_env()
    from providers.upstream import enabled_upstreams

    enabled_upstreams(settings)  # the registry, PROVIDERS and every {SLUG}_BASE_URL
except SettingsError as exc:
    print(f"configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
