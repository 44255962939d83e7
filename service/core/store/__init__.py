"""Token stores: the interface, SQLite (embedded default) and PostgreSQL (several replicas)."""

from config import Settings
from service.core.store.base import StoreUnavailableError, Team, TokenRecord, TokenStore
from service.core.store.sqlite import SQLiteStore


def store_for(settings: Settings) -> TokenStore:
    """The store ``DATABASE_URL`` names; the rest of the gateway only sees ``TokenStore``."""
    if settings.database_dsn is not None:
        # imported here so that a SQLite gateway does not load the PostgreSQL driver (~4 MiB of RSS)
        from service.core.store.postgres import PostgresStore

        return PostgresStore(settings.database_dsn, settings.database_pool_size)
    assert settings.database_path is not None
    return SQLiteStore(settings.database_path)


__all__ = ["SQLiteStore", "StoreUnavailableError", "Team", "TokenRecord", "TokenStore", "store_for"]
