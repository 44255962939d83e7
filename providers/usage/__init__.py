"""Token usage read on the side of a relayed response, one reader per stream format.

The relay calls ``usage_reader(...)`` when the upstream's headers arrive, ``reader.feed(chunk)``
with every raw body chunk as it passes through (any boundaries, still compressed), and
``reader.result()`` once at the end, also when the stream was cut. The body bytes themselves are
never changed, delayed or held whole; a reader never raises.
"""

from __future__ import annotations

from providers.usage.model import NoUsage, Usage, UsageReader
from providers.usage.select import dialect_for, usage_reader

__all__ = ["NoUsage", "Usage", "UsageReader", "dialect_for", "usage_reader"]
