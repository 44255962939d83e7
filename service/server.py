"""The HTTP server below the app: one configuration for the Procfile, ``make run`` and ``gateway serve``.

``python -m service.server [--host H] [--port P] [--workers N]`` validates the settings (exit 3 with
one line naming the variable), binds the listening socket (exit 5 with one line when the address is
taken, before the database or the lifespan is touched), raises the open-files limit, and runs uvicorn
with ``GatewayHttpProtocol``, uvloop and the settings' limits.

The protocol with the limits uvicorn lacks is ``service.protocol``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import socket
import sys
from collections.abc import Sequence

import structlog
import uvicorn
from uvicorn.config import Config
from uvicorn.supervisors import Multiprocess

from config import Settings, SettingsError
from service.protocol import Limits, configure, limits

log = structlog.get_logger("gateway.server")

OK, CONFIGURATION, ADDRESS_IN_USE = 0, 3, 5
STARTUP_FAILURE = 3  # what a worker exits with when its lifespan fails (uvicorn's and the app's)
PROTOCOL = "service.protocol:GatewayHttpProtocol"
KEEP_ALIVE_SECONDS = 75  # above the 60 s idle timeout of common load balancers, so they close first
BACKLOG = 2048


# -- the runner ---------------------------------------------------------------------------------


class CannotListen(Exception):
    """The address is taken (or the OS refuses it); the message says which."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound as uvicorn binds it (SO_REUSEADDR, inheritable by the workers) and
    listening at once, so that the port is held from here on; connections wait in the backlog until
    the app has started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(f"port {port} is already in use (on {host})") from None
        raise CannotListen(f"{host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one (each connection holds one, and so does
    each upstream connection); ``(soft, hard)`` as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def uvicorn_config(settings: Settings, host: str, port: int, workers: int) -> Config:
    """The one server configuration of every way of starting the gateway."""
    return Config(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=PROTOCOL,
        access_log=False,  # the app writes its own access line
        server_header=False,
        proxy_headers=False,
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )


def serve(settings: Settings, *, host: str | None = None, port: int | None = None, workers: int | None = None) -> int:
    """Validate, bind, run until stopped; the exit code. Raises ``SettingsError`` and ``CannotListen``."""
    from providers.prices import load_prices
    from providers.upstream import enabled_upstreams

    enabled_upstreams(settings)  # the providers and their settings fail here, once, not in every worker
    load_prices(settings.prices_file)
    host = host or settings.host
    port = port or settings.port
    workers = workers or settings.web_concurrency
    # the workers read their settings again: let them see the flags' values, as the start-up line shows
    os.environ.update(HOST=host, PORT=str(port), WEB_CONCURRENCY=str(workers))
    settings = dataclasses.replace(settings, host=host, port=port, web_concurrency=workers)
    sock = bind(host, port)  # before the app, the database or the lifespan
    configure(Limits.from_settings(settings))
    soft, _ = raise_open_files_limit()
    config = uvicorn_config(settings, host, port, workers)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if workers == 1:
        config.load()  # the app, which configures the JSON logs; the database opens in the lifespan
        server = uvicorn.Server(config)
        uvicorn_log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
        log.info("server_limits", **_limits_view(), open_files=soft, workers=workers)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        return OK if server.started else STARTUP_FAILURE
    uvicorn_log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
    supervisor = Multiprocess(config, sockets=[sock])
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()
    # uvicorn's supervisor stops when a worker fails to start, and then exits 0 itself
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else OK


def _limits_view() -> dict[str, object]:
    current = limits()
    return {
        "max_header_bytes": current.max_header_bytes,
        "max_header_line_bytes": current.max_header_line_bytes,
        "header_read_timeout_seconds": current.header_read_timeout,
        "max_connections": current.max_connections,
        "keep_alive_seconds": KEEP_ALIVE_SECONDS,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.server", description="Run the gateway's HTTP server.")
    parser.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $PORT or 8787")
    parser.add_argument("--workers", type=int, default=None, help="default: $WEB_CONCURRENCY or 1")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return serve(settings, host=args.host, port=args.port, workers=args.workers)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return CONFIGURATION
    except CannotListen as exc:
        print(f"cannot listen: {exc}", file=sys.stderr, flush=True)
        return ADDRESS_IN_USE


if __name__ == "__main__":
    sys.exit(main())
