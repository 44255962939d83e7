"""Token stores: the interface and its implementations (SQLite embedded; PostgreSQL later)."""

from service.store.base import StoreUnavailableError, Team, TokenStore
from service.store.sqlite import SQLiteStore

__all__ = ["SQLiteStore", "StoreUnavailableError", "Team", "TokenStore"]
