"""Length-controlled win rate: the win rate a judge would give if both answers were as long.

Judges tend to prefer longer answers. Following the idea of length-controlled AlpacaEval
(Dubois et al. 2024, arXiv 2404.04475), we fit a logistic model of each verdict,

    P(A preferred) = sigmoid(theta + beta * tanh(length difference / scale) + gamma * position)

where the length difference is A's answer minus B's in characters, `scale` the standard
deviation of those differences over the items, and `position` +1 when A was shown first and -1
when B was (so a judge's taste for a position is modelled, not blamed on length). The
length-controlled win rate is sigmoid(theta): the predicted preference at equal length and no
position advantage. Ties count as half a win, as in the raw win rate.

The two verdicts of an item share the item, so the standard error is cluster-robust by item
(a sandwich estimator), carried to the win rate by the delta method. This is computed on *our*
judge's verdicts; the leaderboard figure comes from the `alpaca_eval` package with its own judge.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moa.evaluation.pairwise import ItemResult

__all__ = [
    "LengthControlled",
    "Verdict",
    "fit_length_controlled",
    "length_controlled",
    "length_controlled_json",
    "length_controlled_markdown",
]

#: A small ridge on every coefficient keeps the fit finite when the verdicts separate
#: perfectly (a judge that always picks the longer answer, say).
_RIDGE = 1e-2
_ITERATIONS = 50


@dataclass(frozen=True, slots=True)
class Verdict:
    """One judged order of one item, as the model sees it."""

    item: str
    #: A's score on this verdict: 1 win, 0.5 tie, 0 loss.
    score: float
    #: A's answer length minus B's, in characters.
    length_difference: float
    #: +1 when A was shown first, -1 when B was.
    position: float


@dataclass(frozen=True, slots=True)
class LengthControlled:
    win_rate: float
    standard_error: float | None
    #: The fitted coefficients: baseline (theta), length (beta), position (gamma).
    theta: float
    beta: float
    gamma: float
    #: The characters of length difference that one unit of tanh's argument stands for.
    scale: float
    verdicts: int
    items: int


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Solve a small symmetric positive-definite system by Gaussian elimination."""
    n = len(vector)
    a = [[*row, vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for row in range(col + 1, n):
            factor = a[row][col] / a[col][col]
            for k in range(col, n + 1):
                a[row][k] -= factor * a[col][k]
    solution = [0.0] * n
    for row in reversed(range(n)):
        total = a[row][n] - sum(a[row][k] * solution[k] for k in range(row + 1, n))
        solution[row] = total / a[row][row]
    return solution


def _inverse(matrix: list[list[float]]) -> list[list[float]]:
    n = len(matrix)
    columns = [_solve(matrix, [1.0 if i == j else 0.0 for i in range(n)]) for j in range(n)]
    return [[columns[j][i] for j in range(n)] for i in range(n)]


def _product(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    n = len(a)
    return [[sum(a[i][k] * b[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def fit_length_controlled(verdicts: Sequence[Verdict]) -> LengthControlled | None:
    """Fit the model by Newton's method; None when there is nothing to fit."""
    if not verdicts:
        return None
    differences = [v.length_difference for v in verdicts]
    scale = statistics.pstdev(differences) or 1.0
    rows = [
        ([1.0, math.tanh(v.length_difference / scale), v.position], v.score, v.item)
        for v in verdicts
    ]
    weights = [0.0, 0.0, 0.0]
    hessian: list[list[float]] = []
    for _ in range(_ITERATIONS):
        gradient = [-_RIDGE * w for w in weights]
        hessian = [[_RIDGE if i == j else 0.0 for j in range(3)] for i in range(3)]
        for features, target, _item in rows:
            p = _sigmoid(sum(w * f for w, f in zip(weights, features, strict=True)))
            for i in range(3):
                gradient[i] += (target - p) * features[i]
                for j in range(3):
                    hessian[i][j] += p * (1 - p) * features[i] * features[j]
        step = _solve(hessian, gradient)
        weights = [w + s for w, s in zip(weights, step, strict=True)]
        if max(abs(s) for s in step) < 1e-10:
            break
    theta, beta, gamma = weights
    win = _sigmoid(theta)

    # Cluster-robust covariance: the score contributions summed per item.
    per_item: dict[str, list[float]] = {}
    for features, target, item in rows:
        p = _sigmoid(sum(w * f for w, f in zip(weights, features, strict=True)))
        contribution = per_item.setdefault(item, [0.0, 0.0, 0.0])
        for i in range(3):
            contribution[i] += (target - p) * features[i]
    error: float | None = None
    if len(per_item) > 1:
        meat = [[sum(g[i] * g[j] for g in per_item.values()) for j in range(3)] for i in range(3)]
        bread = _inverse(hessian)
        covariance = _product(_product(bread, meat), bread)
        clusters = len(per_item)
        variance = covariance[0][0] * clusters / (clusters - 1)
        error = win * (1 - win) * math.sqrt(max(variance, 0.0))
    return LengthControlled(
        win_rate=win,
        standard_error=error,
        theta=theta,
        beta=beta,
        gamma=gamma,
        scale=scale,
        verdicts=len(verdicts),
        items=len(per_item),
    )


def _length(answers: Sequence[str]) -> int:
    return sum(len(a.strip()) for a in answers)


def length_controlled(results: Sequence[ItemResult]) -> LengthControlled | None:
    """The length-controlled win rate of A over B from a pairwise run's verdicts.

    Items count as in the raw win rate: both orders read; identical answers are ties at zero
    length difference, as they would be judged.
    """
    verdicts: list[Verdict] = []
    for result in results:
        if result.score is None:
            continue
        item = result.item
        difference = float(_length(item.answers_a) - _length(item.answers_b))
        if item.identical:
            verdicts += [Verdict(item.key, 0.5, 0.0, p) for p in (1.0, -1.0)]
            continue
        for judgment in result.judgments:
            score = judgment.a_score
            if score is not None:
                position = 1.0 if judgment.order == "AB" else -1.0
                verdicts.append(Verdict(item.key, score, difference, position))
    return fit_length_controlled(verdicts)


def length_controlled_markdown(fit: LengthControlled | None, judge: str) -> str:
    if fit is None:
        return "\nLength-controlled win rate: n/a (no item with both verdicts read).\n"
    error = "" if fit.standard_error is None else f" ± {100 * fit.standard_error:.1f}"
    return (
        f"\nLength-controlled win rate: **{100 * fit.win_rate:.1f}{error} %**, fitted on the "
        f"verdicts of {judge} ({fit.verdicts} verdicts, {fit.items} items; length coefficient "
        f"{fit.beta:+.2f} per {fit.scale:.0f} characters, position {fit.gamma:+.2f}). This is "
        "our judge's figure; AlpacaEval's leaderboard figure comes from the `alpaca_eval` "
        "package and its own judge.\n"
    )


def length_controlled_json(fit: LengthControlled | None) -> dict[str, Any] | None:
    if fit is None:
        return None
    return {
        "win_rate": round(fit.win_rate, 4),
        "standard_error": None if fit.standard_error is None else round(fit.standard_error, 4),
        "theta": round(fit.theta, 4),
        "length_coefficient": round(fit.beta, 4),
        "position_coefficient": round(fit.gamma, 4),
        "length_scale_chars": round(fit.scale, 1),
        "verdicts": fit.verdicts,
        "items": fit.items,
    }
