"""Reports of `moa eval match`: Markdown for people, JSON (every row's verdict) for scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moa.evaluation.accuracy import CategoryAccuracy, Paired, ScoredSystem, flipped
from moa.evaluation.report import cell, percent, table

__all__ = ["match_json", "match_markdown"]

#: Flipped rows listed in the Markdown report (all of them are in the JSON).
_FLIPS_SHOWN = 40


def _accuracy_row(name: str, acc: CategoryAccuracy) -> list[str]:
    return [name, percent(acc.accuracy), percent(acc.standard_error), str(acc.correct), str(acc.n)]


def _system_markdown(system: ScoredSystem) -> list[str]:
    lines = [
        f"## Accuracy: {cell(system.name)}",
        "",
        f"{cell(system.path)}, matched by `{system.mode}`. "
        f"Per row: {system.mean('calls'):.2f} calls, {system.mean('tokens'):.0f} tokens, "
        f"{system.mean('seconds'):.2f} s.",
        "",
    ]
    rows = [_accuracy_row(cell(c.category), c) for c in system.categories]
    rows.append(_accuracy_row("**overall**", system.overall))
    lines += table(["Category", "Accuracy (%)", "SE (%)", "Correct", "Rows"], rows)
    notes = []
    if system.failed:
        notes.append(f"Rows whose run failed (scored wrong): {system.failed}.")
    if system.missing:
        notes.append(f"Reference rows without a record in the output: {system.missing}.")
    for reason, n in system.skipped.items():
        notes.append(f"Records set aside ({cell(reason)}): {n}.")
    if notes:
        lines += ["", " ".join(notes)]
    return [*lines, ""]


def _paired_markdown(systems: Sequence[ScoredSystem], paired: Paired) -> list[str]:
    a, b = cell(paired.a), cell(paired.b)
    lines = [
        f"## Paired: {b} vs {a}",
        "",
        f"On {paired.n} shared rows: {b} minus {a} = {100 * paired.difference:+.1f} ± "
        f"{100 * paired.standard_error:.1f} points (paired SE). Right in both: {paired.both}; "
        f"{a} only: {len(paired.a_only)}; {b} only: {len(paired.b_only)}; neither: "
        f"{paired.neither}. Exact McNemar test: p = {paired.p_value:.4g}.",
    ]
    if paired.unmatched:
        lines[-1] += f" Rows without a counterpart: {paired.unmatched}."
    flips = list(flipped(systems, paired))
    if flips:
        shown = [
            [cell(row.id), cell(winner), cell(row.question), cell(" / ".join(row.answers))]
            for winner, row in flips[:_FLIPS_SHOWN]
        ]
        lines += ["", *table(["Flipped row", "Right in", "Question", "Accepted"], shown)]
        if len(flips) > _FLIPS_SHOWN:
            lines.append(f"\n… and {len(flips) - _FLIPS_SHOWN} more (see --output-json).")
    return [*lines, ""]


def match_markdown(systems: Sequence[ScoredSystem], paired: Paired | None = None) -> str:
    lines: list[str] = []
    for system in systems:
        lines += _system_markdown(system)
    if paired is not None:
        lines += _paired_markdown(systems, paired)
    return "\n".join(lines)


def _accuracy_json(acc: CategoryAccuracy) -> dict[str, Any]:
    return {
        "accuracy": round(acc.accuracy, 4),
        "standard_error": round(acc.standard_error, 4),
        "correct": acc.correct,
        "n": acc.n,
    }


def _system_json(system: ScoredSystem) -> dict[str, Any]:
    return {
        "name": system.name,
        "path": system.path,
        "match": system.mode,
        "overall": _accuracy_json(system.overall),
        "categories": {c.category: _accuracy_json(c) for c in system.categories},
        "failed_rows": system.failed,
        "missing_rows": system.missing,
        "skipped": dict(system.skipped),
        "per_row": {
            "calls": round(system.mean("calls"), 3),
            "tokens": round(system.mean("tokens"), 1),
            "seconds": round(system.mean("seconds"), 3),
        },
        "rows": [
            {
                "id": r.id,
                "category": r.category,
                "correct": r.correct,
                "ran": r.ran,
                "output": r.output,
                "answers": list(r.answers),
                "calls": r.calls,
                "tokens": r.tokens,
                "seconds": round(r.seconds, 4),
            }
            for r in system.rows
        ],
    }


def match_json(systems: Sequence[ScoredSystem], paired: Paired | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": "match", "systems": [_system_json(s) for s in systems]}
    if paired is not None:
        data["paired"] = {
            "a": paired.a,
            "b": paired.b,
            "n": paired.n,
            "difference": round(paired.difference, 4),
            "standard_error": round(paired.standard_error, 4),
            "p_value": paired.p_value,
            "test": "exact McNemar (two-sided)",
            "both_right": paired.both,
            "neither_right": paired.neither,
            "a_only": list(paired.a_only),
            "b_only": list(paired.b_only),
            "unmatched": paired.unmatched,
        }
    return data
