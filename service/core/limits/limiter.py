"""Which limiter a gateway process uses, and what every one offers.

- ``REDIS_URL`` set: ``RedisLimiter``, exact across every worker and replica.
- One worker process on SQLite: ``MemoryLimiter``, exact in that process. It holds a lock on the
  file ``<database>.limits-lock`` beside the database for as long as it runs, so that a second
  gateway process started on the same file (another ``python -m service.server``) knows.
- Several worker processes (``WEB_CONCURRENCY`` > 1), a PostgreSQL store (which is there for
  replicas), or a SQLite file whose lock another gateway process holds, without ``REDIS_URL``:
  ``UnsharedLimiter``, which enforces nothing per process: the gateway refuses to start while limits
  are stored, the API refuses to set one, and a request under limits set behind its back (by the CLI,
  or by the process holding the lock) gets 503 saying why. Only one process ever counts.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from config import Settings
from service.core.errors import ServiceUnavailable
from service.core.limits.memory import MemoryLimiter, Seeder
from service.core.limits.outcome import Grant, Subject, SubjectState

NEEDS_REDIS = (
    "Limits need REDIS_URL when the gateway runs several worker processes or replicas (WEB_CONCURRENCY > 1, "
    "a PostgreSQL DATABASE_URL, or another gateway process already running on this SQLite database): kept "
    "per process they would multiply by the number of processes."
)


class Limiter(Protocol):
    kind: str

    @property
    def degraded(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        """Count a request against every subject (its prompt-estimate ``tokens``, its worst-case
        ``cost`` in micro-dollars reserved), or raise the 429 of the first limit it would pass."""

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        """The request ended (however it ended): free its lease, settle its real tokens and cost."""

    async def state(self, subject: Subject) -> SubjectState: ...


class UnsharedLimiter:
    """Several processes without a shared store: refuse rather than enforce per process."""

    kind = "unshared"
    degraded = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def admit(self, subjects: Sequence[Subject], tokens: int, cost: int, lease: str) -> Grant:
        raise ServiceUnavailable(NEEDS_REDIS)

    def release(self, grant: Grant, tokens: int, cost: int) -> None:
        return None

    async def state(self, subject: Subject) -> SubjectState:
        return SubjectState(None, 0, 0, 0, 0)


def shared_processes(settings: Settings) -> bool:
    """Whether this gateway may run as several processes (workers or replicas)."""
    return settings.web_concurrency > 1 or settings.database_dsn is not None


def limiter_for(settings: Settings, seed: Seeder) -> Limiter:
    if settings.redis_url is not None:
        # imported here: a gateway without Redis does not load its client
        from service.core.limits.redis_limiter import RedisLimiter

        return RedisLimiter(
            settings.redis_url,
            settings.redis_key_prefix,
            seed,
            lease_seconds=settings.limits_lease_seconds,
            fail_mode=settings.limits_fail_mode,
        )
    if shared_processes(settings):
        return UnsharedLimiter()
    return MemoryLimiter(seed, settings.limits_lease_seconds)


def serving_limiter(settings: Settings, seed: Seeder) -> Limiter:
    """``limiter_for`` a gateway process that serves requests: a ``MemoryLimiter`` only while no other
    gateway process on its SQLite file keeps one (the command line's never counts)."""
    limiter = limiter_for(settings, seed)
    if limiter.kind == "memory" and settings.database_path is not None and not _only_process(settings.database_path):
        return UnsharedLimiter()
    return limiter


_held: dict[str, int] = {}
"""The locks' descriptors by lock file, kept open (and so the locks held) for the life of the process."""


def _only_process(database: Path) -> bool:
    """Whether this is the one gateway process on the SQLite file ``database``: it takes the lock on
    ``<database>.limits-lock`` (or holds it already); another process holding it says otherwise. The
    lock goes with the process, however it ends. A lock file that cannot be made (a read-only
    directory) answers yes: the store itself then tells what is wrong."""
    lock = f"{database.resolve()}.limits-lock"
    if lock in _held:
        return True
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False
    _held[lock] = descriptor
    return True
