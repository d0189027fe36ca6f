"""Straggler cut-off: once a layer has its answers, a hung agent costs about a second, not
its whole timeout (times its retries).

    layer start ──► answers arrive ──► enough are in ──► cut whoever is past its cut-off

"Enough" is `min_ok` answers and at least half of the layer, so that the median is the median
of the layer and not of its fastest agent. Cut-offs are measured from the layer's start, with
medians over the usable answers so far, recomputed as answers keep arriving (a late healthy
answer moves them out). With the defaults (f = 1.5, floor 1 s) an agent is cut when it is 1.5
times as slow as the layer's median and at least a second behind it, where "slow" means:

- for an agent that has sent no text yet: slow to its **first token**, against the median
  time to first token of the answers in. Every answer streams while the layer watches, so a
  hung agent shows as silence early, and is cut as soon as enough answers are in, however long
  those answers took to write;
- for an agent that is writing: slow to **finish**, against the median answer time. An agent
  that is still writing is slow, not hung, and gets the whole grace period.

Agents on the embedded model are never cut: its calls share one model, decoded as a batch of at
most `parallel` calls with the rest queued, so a late one is waiting for the model, not hung.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_CUTOFF", "Cutoff", "StragglerWatch"]


@dataclass(frozen=True, slots=True)
class Cutoff:
    """When a layer stops waiting: `factor` times the median latency, at least `floor` s later."""

    factor: float = 1.5
    floor: float = 1.0

    def after(self, median: float) -> float:
        """Seconds after the layer's start at which agents still running are cut."""
        return max(self.factor * median, median + self.floor)


DEFAULT_CUTOFF = Cutoff()


@dataclass(slots=True)
class StragglerWatch:
    """Follows one layer's answers and says when, and whom, to cut."""

    cutoff: Cutoff | None
    agents: int
    min_ok: int
    started: float
    #: Indices of agents never cut (the embedded model's).
    exempt: frozenset[int] = frozenset()
    #: The layer's clock (the event loop's), for `listen`.
    clock: Callable[[], float] = time.monotonic
    _latencies: list[float] = field(default_factory=list)
    #: Seconds from the layer's start to each agent's first text, once it has sent some.
    _first_text: dict[int, float] = field(default_factory=dict)
    #: The same, for the usable answers only.
    _answers_first_text: list[float] = field(default_factory=list)

    def watches(self, index: int) -> bool:
        """Whether this agent may be cut (its text is then worth listening to)."""
        return self.cutoff is not None and index not in self.exempt

    def listen(self, index: int, forward: Callable[[str], None] | None) -> Callable[[str], None]:
        """An `on_text` for agent `index` that notes when its text starts, then forwards it."""

        def on_text(text: str) -> None:
            if index not in self._first_text:
                self._first_text[index] = self.clock() - self.started
            if forward is not None:
                forward(text)

        return on_text

    def answered(self, index: int, at: float) -> None:
        """Agent `index` gave a usable answer at loop time `at`."""
        self._latencies.append(at - self.started)
        if index in self._first_text:
            self._answers_first_text.append(self._first_text[index])

    @property
    def median(self) -> float:
        return statistics.median(self._latencies) if self._latencies else 0.0

    @property
    def median_first_text(self) -> float:
        first = self._answers_first_text
        return statistics.median(first) if first else 0.0

    def _enough(self) -> bool:
        return len(self._latencies) >= max(self.min_ok, (self.agents + 1) // 2)

    def _silent(self, index: int) -> bool:
        """No text from this agent yet, while the answers in did stream theirs."""
        return index not in self._first_text and bool(self._answers_first_text)

    def cut_at(self, index: int) -> float | None:
        """Loop time at which agent `index` is cut if still running, or None (not yet known)."""
        if self.cutoff is None or index in self.exempt or not self._enough():
            return None
        median = self.median_first_text if self._silent(index) else self.median
        return self.started + self.cutoff.after(median)

    def deadline(self, running: Iterable[int]) -> float | None:
        """The earliest cut among the agents still running, or None."""
        times = [t for t in map(self.cut_at, running) if t is not None]
        return min(times, default=None)

    def due(self, running: Iterable[int], now: float) -> list[int]:
        """The agents among `running` to cut at loop time `now`."""
        return [i for i in running if (t := self.cut_at(i)) is not None and now >= t]

    def reason(self, index: int, now: float) -> str:
        waited = now - self.started
        if self._silent(index):
            what = (
                f"no first token after {waited:.1f} s, when the layer's answers had theirs "
                f"within a median {self.median_first_text:.1f} s"
            )
        else:
            what = f"no answer after {waited:.1f} s, when the layer's median was "
            what += f"{self.median:.1f} s"
        return f"cut off as a straggler: {what} (set wait: all to wait for every agent)"
