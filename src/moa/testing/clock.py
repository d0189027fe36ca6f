"""An event loop on virtual time: whenever it would wait for a timer, the clock jumps to it.

Sleeps, retry backoffs, timeouts and deadlines then take no real time and happen at exact
times, so a test can say "the retry waited 1 s" as `elapsed == 1.0` instead of a tolerance
that a busy machine breaks. Only in-process work fits (`moa.testing.ScriptedProvider`): real
I/O and threads take real time while the virtual clock stands still or jumps past them.

    result = run_virtual(moa.arun("question?"))
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualClockLoop", "run_virtual"]

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """Returns ready I/O at once, if any; otherwise moves the clock past the wait instead of
    sleeping. With no timer pending (`timeout` None) it blocks: something real must wake it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        ready = super().select(0)
        if not ready:
            self.now += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """`loop.time()` starts at 0 and moves only when every task waits for a timer."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def run_virtual(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a VirtualClockLoop."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(coroutine)
