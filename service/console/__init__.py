"""The admin console: server-rendered pages at ``/admin`` over the same store and report helpers as
the JSON API. ``ADMIN_CONSOLE=false`` leaves it out of the app altogether."""

from __future__ import annotations

from service.console.pages import Console
from service.console.web import SecurityHeaders

__all__ = ["Console", "SecurityHeaders"]
