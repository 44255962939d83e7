"""The gateway service: app factory, token API, store, errors."""
