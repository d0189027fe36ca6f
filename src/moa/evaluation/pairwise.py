"""Pairwise evaluation: the win rate of system A over system B, as a judge sees it.

Every item is judged twice, once with A's answer shown first and once with B's, so a judge
that favours a position gives each system that advantage once and the bias cancels. Each
verdict scores A 1 (A better), 0.5 (tie) or 0 (B better); an item's score is the mean of its
two verdicts, and the win rate is the mean item score with the standard error over items.

An item counts only when both of its verdicts were read: scoring it on one order alone would
bring back the position bias the second order is there to cancel. Items left out this way are
counted and reported, as are unparseable verdicts and failed judge calls.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from moa.evaluation.judges import Judge, PairChoice, pairwise_messages, parse_pair_verdict
from moa.providers.base import ChatMessage

__all__ = [
    "ItemResult",
    "OrderJudgment",
    "PairItem",
    "PairwiseReport",
    "PairwiseSummary",
    "SystemInfo",
    "judge_pairs",
    "summarize",
    "win_rate",
]

#: AB: A's answer shown first (as Response A); BA: B's answer shown first.
Order = Literal["AB", "BA"]
Winner = Literal["A", "B", "tie"]
ORDERS: tuple[Order, Order] = ("AB", "BA")


@dataclass(frozen=True, slots=True)
class PairItem:
    """One prompt with both systems' answers."""

    key: str
    #: Context both systems were given before the turns: a system prompt, earlier messages.
    history: tuple[ChatMessage, ...]
    #: The user's messages, answered one after another (one for AlpacaEval-style prompts).
    turns: tuple[str, ...]
    #: Each system's answers, one per turn.
    answers_a: tuple[str, ...]
    answers_b: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return [a.strip() for a in self.answers_a] == [b.strip() for b in self.answers_b]


@dataclass(frozen=True, slots=True)
class OrderJudgment:
    """The judge's verdict on one order of one item."""

    order: Order
    #: The position the judge picked; None when the call failed or the verdict was unreadable.
    choice: PairChoice | None
    judge_output: str = ""
    #: Why there is no choice.
    problem: str | None = None
    #: True when the call itself failed (as opposed to an answer without a readable verdict).
    failed: bool = False

    @property
    def winner(self) -> Winner | None:
        """The choice mapped from position back to system."""
        if self.choice is None or self.choice == "tie":
            return self.choice
        first: Winner = "A" if self.order == "AB" else "B"
        second: Winner = "B" if self.order == "AB" else "A"
        return first if self.choice == "first" else second

    @property
    def a_score(self) -> float | None:
        return _WINNER_SCORE[self.winner] if self.winner is not None else None


_WINNER_SCORE: dict[Winner, float] = {"A": 1.0, "tie": 0.5, "B": 0.0}


@dataclass(frozen=True, slots=True)
class ItemResult:
    item: PairItem
    judgments: tuple[OrderJudgment, ...] = ()

    @property
    def score(self) -> float | None:
        """A's score on this item in [0, 1]; None unless every order has a verdict. Identical
        answers are a tie without asking the judge."""
        if self.item.identical:
            return 0.5
        scores = [j.a_score for j in self.judgments]
        if not scores or any(s is None for s in scores):
            return None
        return sum(s for s in scores if s is not None) / len(scores)


def win_rate(scores: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean score and its standard error (sample standard deviation / sqrt(n)).

    No scores: (None, None). One score: its value and no standard error, which needs two.
    """
    if not scores:
        return None, None
    mean = statistics.fmean(scores)
    if len(scores) < 2:
        return mean, None
    return mean, statistics.stdev(scores) / math.sqrt(len(scores))


@dataclass(frozen=True, slots=True)
class PairwiseSummary:
    items: int
    scored: int
    #: A's mean item score in [0, 1] (ties count half) and its standard error over items.
    win_rate: float | None
    standard_error: float | None
    #: Items by their score: above, at or below one half.
    wins: int
    ties: int
    losses: int
    identical: int
    verdicts: int
    unparseable: int
    failed_calls: int
    #: Items with at least one verdict missing, so left out of the win rate.
    incomplete: int
    #: Of the items with both verdicts read, how many got the same winner in both orders.
    consistent: int
    #: Of the decisive verdicts (not ties), the share that picked the response shown first:
    #: near 0.5 for a judge without position bias.
    first_shown_rate: float | None

    @property
    def both_read(self) -> int:
        return self.scored - self.identical


def summarize(results: Sequence[ItemResult]) -> PairwiseSummary:
    scores = [r.score for r in results if r.score is not None]
    mean, se = win_rate(scores)
    judgments = [j for r in results for j in r.judgments]
    decisive = [j for j in judgments if j.choice in ("first", "second")]
    consistent = sum(
        1
        for r in results
        if not r.item.identical
        and r.score is not None
        and len({j.winner for j in r.judgments}) == 1
    )
    return PairwiseSummary(
        items=len(results),
        scored=len(scores),
        win_rate=mean,
        standard_error=se,
        wins=sum(s > 0.5 for s in scores),
        ties=sum(s == 0.5 for s in scores),
        losses=sum(s < 0.5 for s in scores),
        identical=sum(r.item.identical for r in results),
        verdicts=sum(j.choice is not None for j in judgments),
        unparseable=sum(j.choice is None and not j.failed for j in judgments),
        failed_calls=sum(j.failed for j in judgments),
        incomplete=sum(r.score is None for r in results),
        consistent=consistent,
        first_shown_rate=(
            sum(j.choice == "first" for j in decisive) / len(decisive) if decisive else None
        ),
    )


async def _judge_order(judge: Judge, item: PairItem, order: Order) -> OrderJudgment:
    first, second = (
        (item.answers_a, item.answers_b) if order == "AB" else (item.answers_b, item.answers_a)
    )
    reply = await judge.ask(pairwise_messages(item.history, item.turns, first, second))
    if reply.failed:
        return OrderJudgment(order, None, reply.text, problem=reply.error, failed=True)
    verdict = parse_pair_verdict(reply.text)
    return OrderJudgment(order, verdict.choice, reply.text, problem=verdict.problem)


async def _judge_item(
    judge: Judge, item: PairItem, on_done: Callable[[int], None] | None
) -> ItemResult:
    judgments: tuple[OrderJudgment, ...] = ()
    if not item.identical:  # a tie without asking the judge
        judgments = tuple(await asyncio.gather(*(_judge_order(judge, item, o) for o in ORDERS)))
    if on_done is not None:
        on_done(2)
    return ItemResult(item, judgments)


async def judge_pairs(
    judge: Judge,
    items: Sequence[PairItem],
    *,
    on_done: Callable[[int], None] | None = None,
) -> list[ItemResult]:
    """Judge every item in both orders, `judge`'s concurrency at a time; results in item order.

    `on_done(n)` is told each time n more of the 2·len(items) verdicts are settled.
    """
    return list(await asyncio.gather(*(_judge_item(judge, item, on_done) for item in items)))


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """Where one side's answers came from, and what was set aside while reading them (the
    report's JSON keeps it field by field, in this order)."""

    name: str
    path: str
    rows: int
    #: Usable rows with no counterpart in the other file.
    unmatched: int = 0
    #: Rows not usable, by reason (a failed batch row, no output, a duplicate key...).
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PairwiseReport:
    a: SystemInfo
    b: SystemInfo
    judge: str
    matched_by: Literal["id", "instruction"]
    results: tuple[ItemResult, ...]
    summary: PairwiseSummary
    #: Items matched by id whose prompts differ between the two files: worth a look.
    prompt_mismatches: int = 0
    #: Matched rows not judged because A and B answered different numbers of turns.
    turn_mismatches: int = 0
