"""The real PostgreSQL of this machine, one fresh schema per test, and a TCP proxy to cut it off.

Locally a missing PostgreSQL skips these tests; in CI (``CI`` set) it fails them: `.ci/run` starts
the server, so unreachable there is a real failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
from collections.abc import Iterator

import asyncpg
import pytest

PG_ROOT = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def postgres_reachable() -> bool:
    async def probe() -> None:
        connection = await asyncpg.connect(PG_ROOT, timeout=3)
        await connection.close()

    try:
        _run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


def require_postgres() -> None:
    if postgres_reachable():
        return
    message = f"PostgreSQL is not reachable at {PG_ROOT}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI starts it in .ci/run; this is a real failure)")
    pytest.skip(message)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A DSN whose search_path is a schema of its own, dropped afterwards."""
    require_postgres()
    schema = "t_" + secrets.token_hex(6)

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(PG_ROOT)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    _run(execute(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_ROOT}?search_path={schema}"
    finally:
        _run(execute(f"DROP SCHEMA {schema} CASCADE"))


class TcpProxy:
    """A port that forwards to a real server until ``down()``: then nothing listens and open
    connections are cut; ``up()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def up(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def down(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(stop())


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the real PostgreSQL, for cutting a gateway off its database."""
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.up()
    yield proxy
    proxy.down()
