"""What every engine of `moa batch` shares: the job and the ledger (in one process too).

    driver (one process)                              workers (processes or Ray actors)
    RowLedger: rows waiting / held by each worker ─► RowWorker.run(row) (moa.batch.runner): the
      the one OutputStore writer, stats, progress ◄─   pipeline, shared cache, GatedProvider
    Gatekeeper: every provider's limits         ◄──── admit / finish per upstream call

Exactly-once: only the driver writes, a row is written when its first result arrives and
never again (a late duplicate from a worker presumed dead is dropped), and the rows a dead
worker held go back to the front of the queue. The output stays the fsynced append-only file
of a single-process run, so `kill -9` of the driver resumes the same way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa.batch.progress import BatchStats, ProgressView
from moa.batch.rows import Row
from moa.batch.store import OutputStore
from moa.config import ConfigFile
from moa.pricing import Cost
from moa.providers.cache import CacheStats
from moa.results import Usage

__all__ = ["Job", "RowDone", "RowLedger"]


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to build the same pipeline as the driver (picklable)."""

    config: ConfigFile
    pipeline: str | None
    #: The API keys the providers name, from the driver's environment (its .env file applied):
    #: all a worker sees of it.
    env: dict[str, str]
    generator: str
    cache_path: Path | None
    #: Rows run at once in each worker (in the one worker of a single-process run: all of them).
    concurrency: int


@dataclass(frozen=True, slots=True)
class RowDone:
    """A finished row as a worker sends it back: the output line and the figures for stats."""

    index: int
    record: dict[str, Any]
    ok: bool
    usage: Usage
    cost: Cost
    #: The worker's cache counters so far (its totals, not a delta).
    cache: tuple[int, int, int] | None = None


@dataclass
class RowLedger:
    """The driver's account of a batch: rows waiting, rows each worker holds, rows written."""

    rows: Sequence[Row]
    store: OutputStore
    stats: BatchStats
    progress: ProgressView
    waiting: deque[int] = field(default_factory=deque)
    held: dict[str, set[int]] = field(default_factory=dict)
    #: Rows re-queued because the worker holding them died.
    requeued: int = 0
    #: Rows written by this run (failed ones included): never written twice.
    written: set[int] = field(default_factory=set)
    _cache: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.waiting.extend(
            i for i, row in enumerate(self.rows) if row.key not in self.store.finished
        )
        self.stats.started = time.monotonic()  # the rate counts rows, not the set-up before them
        if self.stats.cache is None:
            self.stats.cache = CacheStats()

    @property
    def finished(self) -> bool:
        return not self.waiting and not any(self.held.values())

    def take(self, worker: str) -> int | None:
        """The next row for `worker`, or None when none is waiting."""
        if not self.waiting:
            return None
        index = self.waiting.popleft()
        self.held.setdefault(worker, set()).add(index)
        return index

    async def done(self, worker: str, done: RowDone) -> None:
        """Write a finished row, unless it was already written (then the duplicate is dropped)."""
        self.held.get(worker, set()).discard(done.index)
        if done.index in self.written:
            return
        self.written.add(done.index)
        await self.store.append(done.record)
        stats = self.stats
        stats.count(done.ok, done.usage, done.cost)
        if done.cache is not None and stats.cache is not None:
            self._cache[worker] = done.cache
            totals = [sum(c[i] for c in self._cache.values()) for i in range(3)]
            stats.cache.hits, stats.cache.misses, stats.cache.writes = totals
        self.progress.update(stats)

    def give_back(self, worker: str, index: int) -> bool:
        """One row whose worker died before answering goes back to the front of the queue."""
        self.held.get(worker, set()).discard(index)
        if index in self.written:
            return False
        self.waiting.appendleft(index)
        self.requeued += 1
        return True

    def lost(self, worker: str) -> int:
        """A worker died: its rows go back to the front of the queue, in their order. Returns
        how many."""
        returned = 0
        # Last row first: each goes to the front of the queue, so the first ends up first.
        for index in sorted(self.held.get(worker, ()), reverse=True):
            if self.give_back(worker, index):
                returned += 1
        return returned
