"""Straggler cut-off: once a layer has its answers, a hung agent costs about a second, not
its whole timeout (times its retries).

    layer start ──► answers arrive ──► enough are in ──► cut at max(f × median, median + floor)

"Enough" is `min_ok` answers and at least half of the layer, so that the median is the median
of the layer and not of its fastest agent. The cut-off is measured from the layer's start, with
the median of the usable answers' latencies so far, recomputed as answers keep arriving (a late
healthy answer moves it out). With the defaults (f = 1.5, floor 1 s) an agent is cut when it is
1.5 times as slow as the layer's median and at least a second behind it.

Agents on the embedded model are never cut: its calls queue on one thread, so a late one is
waiting its turn, not hung.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
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
    _latencies: list[float] = field(default_factory=list)

    def answered(self, at: float) -> None:
        """A usable answer arrived at loop time `at`."""
        self._latencies.append(at - self.started)

    @property
    def median(self) -> float:
        return statistics.median(self._latencies) if self._latencies else 0.0

    def deadline(self) -> float | None:
        """Loop time at which stragglers are cut, or None (not enough answers yet, or off)."""
        enough = max(self.min_ok, (self.agents + 1) // 2)
        if self.cutoff is None or len(self._latencies) < enough:
            return None
        return self.started + self.cutoff.after(self.median)

    def stragglers(self, running: Iterable[int]) -> list[int]:
        return [index for index in running if index not in self.exempt]

    def reason(self, now: float) -> str:
        return (
            f"cut off as a straggler: no answer after {now - self.started:.1f} s, when the "
            f"layer's median was {self.median:.1f} s (set wait: all to wait for every agent)"
        )
