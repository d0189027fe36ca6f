"""Token budgets: fitting references into a context window, and a run's `max_total_tokens`."""

from __future__ import annotations

from collections.abc import Sequence

from moa.errors import BudgetExceeded

__all__ = ["CUT_MARKER", "RunBudget", "fit_references"]

CUT_MARKER = "\n[… the rest of this answer was cut to fit the context window]"
#: Every reference keeps at least this many tokens of its head, however tight the window.
MIN_REFERENCE_TOKENS = 16


def fit_references(
    references: Sequence[str], sizes: Sequence[int], budget: int, marker_cost: int
) -> tuple[list[str], bool]:
    """Shrink references fairly so together they take at most `budget` tokens.

    Water-filling: short answers stay whole, and the long ones are cut to one equal share of
    what is left, each keeping its head and ending with CUT_MARKER. `sizes` are the references'
    token counts and `marker_cost` the marker's. Returns the references and whether any was cut.
    """
    if sum(sizes) <= budget:
        return list(references), False
    order = sorted(range(len(references)), key=lambda i: sizes[i])
    remaining_budget = max(budget, 0)
    remaining = len(references)
    shares = [0] * len(references)
    for i in order:
        share = remaining_budget // remaining
        shares[i] = min(sizes[i], share)
        remaining_budget -= shares[i]
        remaining -= 1
    fitted: list[str] = []
    for text, size, share in zip(references, sizes, shares, strict=True):
        if share >= size:
            fitted.append(text)
            continue
        keep_tokens = max(share - marker_cost, MIN_REFERENCE_TOKENS)
        keep_chars = max(1, len(text) * keep_tokens // max(size, 1))
        fitted.append(text[:keep_chars].rstrip() + CUT_MARKER)
    return fitted, True


class RunBudget:
    """`max_total_tokens` for one run: a call reserves its worst case before it starts."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._reserved = 0

    def reserve(self, tokens: int) -> None:
        """Hold `tokens` for a call about to start; BudgetExceeded if they would not fit."""
        if self.limit is not None and self.used + self._reserved + tokens > self.limit:
            raise BudgetExceeded(self.used + self._reserved, tokens, self.limit)
        self._reserved += tokens

    def settle(self, reserved: int, actual: int) -> None:
        """Release a reservation of `reserved` tokens, counting the `actual` ones spent."""
        self._reserved -= reserved
        self.used += actual
