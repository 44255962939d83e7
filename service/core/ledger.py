"""The usage ledger: one row per proxied request, written in batches off the request path.

The request path only appends a row's values (``LedgerValues``) to a bounded in-memory queue (``record``: a list
append, never an await, never a block). A task writes what is queued every ``flush_seconds``
(one), or as soon as a batch is full, in one store transaction per batch (a transaction costs about
as much as fifty rows, so rows are not written one by one). When the queue is full the row is
dropped and counted (``dropped``, a metric and a warning line per burst), so a slow or unreachable
database never slows a request. ``stop()`` (a clean shutdown, SIGTERM) writes everything still queued.
A batch the store refuses is kept and tried again (it counts against the queue's bound).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import structlog

from service.core.store.base import StoreUnavailableError

log = structlog.get_logger("gateway.ledger")

MAX_QUEUE = 50_000
FLUSH_SECONDS = 1.0
BATCH = 1_000


class LedgerRow(NamedTuple):
    """One ledger row, its fields in the table's column order (a store's reading; and a
    ``LedgerValues`` to write)."""

    request_id: str
    """The gateway's own id for the request (unique; ``x-gateway-request-id``)."""
    client_request_id: str | None
    """The client's ``x-request-id``, when it sent one: recorded beside, never the row's identity."""
    at: str
    """When the request arrived: ``2026-11-30T14:02:11.482Z`` (UTC)."""
    team_id: str
    key_id: str
    provider: str
    model: str | None
    status: int
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None
    reasoning_tokens: int | None
    cost_micro_usd: int | None
    """Exact, in millionths of a dollar; ``None`` when the model has no price (never 0 for that)."""
    duration_ms: float
    ttfb_ms: float | None
    complete: bool
    """The response reached its end (``False``: cut short; what was known is recorded)."""


LedgerValues = tuple[
    str, str | None, str, str, str, str, str | None, int,
    int | None, int | None, int | None, int | None, int | None, int | None,
    float, float | None, int,
]  # fmt: skip
"""A row as the request path makes it: a plain tuple of ``LedgerRow``'s fields in order, ``complete``
as 1 or 0 (sqlite3 sends a ``bool`` through its adapters: a call per row). The stores bind it as it is;
a tuple of another type (a ``LedgerRow`` itself) costs sqlite3 half as much again."""


class UsageStore(Protocol):
    async def record_usage(self, rows: Sequence[LedgerValues]) -> None: ...


class Ledger:
    def __init__(
        self,
        store: UsageStore,
        *,
        max_queue: int = MAX_QUEUE,
        flush_seconds: float = FLUSH_SECONDS,
        batch: int = BATCH,
    ) -> None:
        self.store = store
        self.max_queue = max_queue
        self.flush_seconds = flush_seconds
        self.batch = batch
        self.queue: list[LedgerValues] = []
        self.dropped = 0
        self.written = 0
        self._dropping = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def record(self, row: LedgerValues) -> None:
        """Queue a row; never waits. A full queue drops it (counted, logged once per burst)."""
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("usage_rows_dropped", reason="queue full", max_queue=self.max_queue)
            return
        self.queue.append(row)
        if len(self.queue) >= self.batch:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
            self._wake.clear()
            try:
                await self.flush(len(self.queue))
            except Exception as exc:  # the writer never stops: what is queued is tried again next turn
                log.error("usage_writer_error", error=type(exc).__name__)

    async def flush(self, count: int | None = None) -> None:
        """Write everything queued, rows queued meanwhile included, a batch at a time; stop at the
        first batch the store refuses.

        With ``count``, only the first that many: the writer's turn takes what was queued when it
        began, and rows queued while it writes wait for the next turn (at most ``flush_seconds``)
        rather than going out in batches of one or two behind each write."""
        left = count
        while self.queue and (left is None or left > 0):
            rows = self.queue[: self.batch if left is None else min(self.batch, left)]
            try:
                await self.store.record_usage(rows)
            except StoreUnavailableError as exc:
                log.warning("usage_write_failed", rows=len(rows), error=str(exc))
                return
            except Exception as exc:  # the store refused what the batch holds: written row by row
                log.error("usage_batch_refused", rows=len(rows), error=type(exc).__name__)
                done = await self._write_each(rows)
                del self.queue[:done]
                if done < len(rows):
                    return
            else:
                del self.queue[: len(rows)]
                self.written += len(rows)
            if left is not None:
                left -= len(rows)
            if self._dropping and len(self.queue) < self.max_queue // 2:
                log.info("usage_rows_dropped_total", dropped=self.dropped)
                self._dropping = False

    async def _write_each(self, rows: list[LedgerValues]) -> int:
        """The rows of a refused batch one by one, so that one bad row never holds the others back:
        a row the store refuses is dropped (counted and logged). How many were written or dropped;
        fewer than all when the store went away meanwhile (the rest stay queued)."""
        for index, row in enumerate(rows):
            try:
                await self.store.record_usage([row])
            except StoreUnavailableError as exc:
                log.warning("usage_write_failed", rows=len(rows) - index, error=str(exc))
                return index
            except Exception as exc:
                self.dropped += 1
                log.error(
                    "usage_row_dropped", request_id=row[0], reason="refused by the store", error=type(exc).__name__
                )
            else:
                self.written += 1
        return len(rows)

    async def stop(self) -> None:
        """Stop the writer and write what is still queued (a clean shutdown loses no row)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self.queue:
            log.error("usage_rows_lost_at_stop", rows=len(self.queue))
