"""Providers: a declarative description each (``catalog.toml`` or a tiny module), the registry,
where their requests go (through Cloudflare AI Gateway or direct), and the shared mount and relay."""
