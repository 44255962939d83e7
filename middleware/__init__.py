"""Pure-ASGI middleware: request context and access log, auth, metadata."""
