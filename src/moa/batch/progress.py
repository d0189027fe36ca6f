"""Progress on stderr, one bar for every long command (`progress_bar`).

`moa batch`: a live bar on a terminal, plain periodic lines anywhere else (a log file, CI),
both showing rows done, rate, ETA, failures, tokens and cost so far. `moa eval`: a bar of judge
calls on a terminal (`CountBar`), nothing elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from moa.pricing import Cost
from moa.providers.cache import CacheStats
from moa.results import Usage

__all__ = [
    "BatchStats",
    "CountBar",
    "PlainProgress",
    "ProgressView",
    "TerminalProgress",
    "make_progress",
    "progress_bar",
    "showing_progress",
]


@dataclass(slots=True)
class BatchStats:
    """Counts of one `moa batch` run, updated as rows finish."""

    total: int
    #: Rows already finished in the output before this run: skipped.
    skipped: int = 0
    succeeded: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: Cost = field(default_factory=Cost)
    cache: CacheStats | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def count(self, ok: bool, usage: Usage, cost: Cost) -> None:
        """One row finished by this run."""
        self.usage, self.cost = self.usage + usage, self.cost + cost
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1

    @property
    def ran(self) -> int:
        """Rows finished (well or not) by this run."""
        return self.succeeded + self.failed

    @property
    def to_run(self) -> int:
        return self.total - self.skipped

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Rows per second in this run."""
        elapsed = self.elapsed_s
        return self.ran / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.to_run - self.ran) / rate if rate > 0 else None

    def describe(self) -> str:
        """One line: what is done and what it cost so far."""
        parts = [
            f"{self.skipped + self.ran}/{self.total} rows",
            f"{self.failed} failed",
            f"{self.rate:.2f} rows/s",
            f"ETA {format_duration(self.eta_s)}",
            f"{format_tokens(self.usage.total_tokens)} tokens",
            format_cost(self.cost),
        ]
        if self.cache is not None and (self.cache.hits or self.cache.misses):
            parts.append(f"cache {self.cache.hits} hits/{self.cache.misses} misses")
        return ", ".join(parts)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_tokens(tokens: int) -> str:
    if tokens >= 1_000_000:
        return f"{tokens / 1_000_000:.2f}M"
    if tokens >= 10_000:
        return f"{tokens / 1000:.0f}k"
    return str(tokens)


def format_cost(cost: Cost) -> str:
    if not cost.known:
        return "cost n/a (no prices configured)"
    text = f"${cost.usd:.4f}" if cost.usd < 1 else f"${cost.usd:,.2f}"
    return text + (f" (+{cost.unpriced} unpriced calls)" if cost.unpriced else "")


def progress_bar(
    label: str, console: Console, *after: ProgressColumn, transient: bool = False, **options: Any
) -> Progress:
    """The bar of every long command: its label, the bar, done/total, then `after`."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), *after)
    return Progress(*columns, console=console, transient=transient, refresh_per_second=4, **options)


class CountBar:
    """Jobs done out of a total told when the work starts (`started`, then `done` as they
    settle), as a bar that goes away at the end; on a stream that is not a terminal, nothing."""

    def __init__(self, label: str, stream: TextIO) -> None:
        console, silent = Console(file=stream), not stream.isatty()
        self._bar = progress_bar(
            label, console, TimeElapsedColumn(), transient=True, disable=silent
        )
        self._task = self._bar.add_task(label, total=None)

    def __enter__(self) -> CountBar:
        self._bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._bar.stop()

    def started(self, total: int) -> None:
        self._bar.update(self._task, total=total)

    def done(self, n: int) -> None:
        self._bar.advance(self._task, n)


class ProgressView(Protocol):
    def start(self, stats: BatchStats) -> None: ...

    def update(self, stats: BatchStats) -> None: ...

    def finish(self, stats: BatchStats, *, completed: bool = True) -> None: ...


class PlainProgress:
    """A line every `interval` seconds (as rows finish) and one at the end."""

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._last = 0.0

    def _line(self, text: str) -> None:
        self.stream.write(f"batch: {text}\n")
        self.stream.flush()

    def start(self, stats: BatchStats) -> None:
        self._last = time.monotonic()
        already = f", {stats.skipped} already done" if stats.skipped else ""
        self._line(f"{stats.to_run} rows to run of {stats.total}{already}")

    def update(self, stats: BatchStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(stats.describe())

    def finish(self, stats: BatchStats, *, completed: bool = True) -> None:
        self._line(_summary(stats, completed))


class TerminalProgress:
    """A rich progress bar; the counters live in the description after the bar."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = progress_bar("[bold]batch", console, TextColumn("{task.description}"))
        self._task = self._progress.add_task("", total=1)

    def _describe(self, stats: BatchStats) -> str:
        failed = f"[red]{stats.failed} failed[/]" if stats.failed else "0 failed"
        return (
            f"{stats.rate:.2f} rows/s  ETA {format_duration(stats.eta_s)}  {failed}  "
            f"{format_tokens(stats.usage.total_tokens)} tokens  {format_cost(stats.cost)}"
        )

    def start(self, stats: BatchStats) -> None:
        self._progress.update(
            self._task,
            total=stats.total,
            completed=stats.skipped,
            description=self._describe(stats),
        )
        self._progress.start()

    def update(self, stats: BatchStats) -> None:
        self._progress.update(
            self._task, completed=stats.skipped + stats.ran, description=self._describe(stats)
        )

    def finish(self, stats: BatchStats, *, completed: bool = True) -> None:
        self.update(stats)
        self._progress.stop()
        self.console.print(f"batch {_summary(stats, completed)}", highlight=False)


def _summary(stats: BatchStats, completed: bool) -> str:
    """The last line of a run: how it ended, after how long, with what."""
    ending = "done in" if completed else "stopped (rerun the same command to resume) after"
    return f"{ending} {format_duration(stats.elapsed_s)}: {stats.describe()}"


def make_progress(stream: TextIO, *, interval: float = 10.0) -> ProgressView:
    """A bar when `stream` is a terminal, else plain lines."""
    if stream.isatty():
        return TerminalProgress(Console(file=stream))
    return PlainProgress(stream, interval)


@contextlib.contextmanager
def showing_progress(stats: BatchStats, *, interval: float) -> Iterator[ProgressView]:
    """The progress of a run on stderr, from its start to its end, or to where it stopped."""
    progress = make_progress(sys.stderr, interval=interval)
    progress.start(stats)
    completed = False
    try:
        yield progress
        completed = True
        stats.ended = time.monotonic()
    finally:
        progress.finish(stats, completed=completed)
