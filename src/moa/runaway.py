"""The runaway guard: notice a generation that repeats the same span over and over.

Small models sampled at low temperature fall into loops ("This is not just a simple answer, but
a multi-answer ..." ten times, until max_tokens runs out). A loop costs the whole token budget
and, worse, reaches the next layer looking like an answer. The guard watches the text as it
grows; once its end has become periodic — a span repeated back to back at least MIN_COPIES
times and over at least MIN_LOOP_CHARS characters — it reports where the first copy ends, and the
caller stops the generation there.

Legitimate answers rarely repeat a span verbatim three times in a row over 200 characters. A
span shorter than MIN_PERIOD characters ("AAAA…", "ha ha ha", a rule of dashes) is not the kind
of loop meant here and is left alone, however long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "MIN_COPIES",
    "MIN_LOOP_CHARS",
    "MIN_PERIOD",
    "RUNAWAY_CAUSE",
    "RUNAWAY_FINISH",
    "Runaway",
    "RunawayGuard",
    "find_runaway",
]

#: The finish_reason of a completion the guard stopped, and the cause recorded when the
#: provider stopped it (so the loop's size is not known here).
RUNAWAY_FINISH = "runaway"
RUNAWAY_CAUSE = (
    "stopped a runaway generation: it kept repeating itself; kept the text up to its first repeat"
)

#: The shortest repeating span that counts, in characters.
MIN_PERIOD = 10
#: The least number of copies, and the least length of the repeating region, that count.
MIN_COPIES = 3
MIN_LOOP_CHARS = 200
#: Characters of the text's end searched for earlier copies of it.
_KEY = 12
#: How much new text the streaming guard waits for between looks (looking costs a few scans).
_CHECK_EVERY = 24


@dataclass(frozen=True, slots=True)
class Runaway:
    """A loop found: keep `text[:keep]`; the loop's span is `period` characters long."""

    keep: int
    period: int
    copies: int

    def describe(self) -> str:
        return (
            f"stopped a runaway generation: a {self.period}-character span repeated "
            f"{self.copies} times in a row; kept the text up to its first repeat"
        )


def find_runaway(text: str) -> Runaway | None:
    """The loop the end of `text` is caught in, if any (see the module docstring)."""
    n = len(text)
    if n < MIN_LOOP_CHARS:
        return None
    tail = text[n - _KEY :]
    # Every period the text's end can have shows up as an earlier copy of its last characters.
    end = n - 1
    while True:
        position = text.rfind(tail, 0, end)
        if position < 0:
            return None
        end = position + _KEY - 1
        period = n - _KEY - position
        if period < MIN_PERIOD:
            continue
        copies = max(MIN_COPIES, math.ceil(MIN_LOOP_CHARS / period))
        if copies * period > n:
            return None  # longer periods cannot repeat often enough either
        if text[n - copies * period : n - period] == text[n - (copies - 1) * period :]:
            span = text[n - period :]
            if (span + span).find(span, 1) < MIN_PERIOD:
                return None  # made of a shorter unit ("AAAA…"): not a long span repeating
            return _loop(text, period)


def _loop(text: str, period: int) -> Runaway:
    """Extend the periodic region back to where the loop began; keep its first copy."""
    start = len(text) - 2 * period
    while start > 0 and text[start - 1] == text[start - 1 + period]:
        start -= 1
    copies = (len(text) - start) // period
    # Where the first copy ends is ambiguous by a rotation ("… answer. " + "This … answer. "
    # can be cut before or after ". "): end it at the nearest sentence or line end, if one is
    # close.
    keep = start + period
    for shift in range(min(period // 2, 40) + 1):
        ends = [end for end in (keep + shift, keep - shift) if start < end <= len(text)]
        end = next((e for e in ends if text[e - 1] in ".!?\n"), None)
        if end is not None:
            keep = end
            break
    return Runaway(keep=len(text[:keep].rstrip()), period=period, copies=copies)


class RunawayGuard:
    """Feed it a stream's text piece by piece; it returns a Runaway as soon as one shows."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self._checked = 0

    def feed(self, piece: str) -> Runaway | None:
        self._parts.append(piece)
        self._length += len(piece)
        if self._length - self._checked < _CHECK_EVERY:
            return None
        self._checked = self._length
        text = "".join(self._parts)
        self._parts = [text]
        return find_runaway(text)
