"""FLASK reports: Markdown tables with the answer files side by side, and a JSON document that
keeps every judge reply."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moa.evaluation.flask import SKILLS, FlaskReport, FlaskSystemSummary, MeanScore
from moa.evaluation.report import cell, table

__all__ = ["flask_json", "flask_markdown"]


def _score(score: MeanScore) -> str:
    if score.mean is None:
        return "n/a"
    error = "" if score.standard_error is None else f" ± {score.standard_error:.2f}"
    return f"{score.mean:.2f}{error} ({score.n})"


def _section(
    report: FlaskReport,
    title: str,
    keys: list[str],
    pick: Callable[[FlaskSystemSummary], dict[str, MeanScore]],
) -> list[str]:
    header = [title, *(cell(s.name) for s in report.systems)]
    empty = MeanScore(None, None, 0)
    rows = [[cell(key), *(_score(pick(s).get(key, empty)) for s in report.systems)] for key in keys]
    return [*table(header, rows), ""]


def flask_markdown(report: FlaskReport) -> str:
    lines = [
        "## FLASK",
        "",
        f"Judge: {cell(report.judge)}. Each answer scored 1-5 on its item's skills, the "
        f"reference answer in view; {report.items} items. Cells: mean ± standard error "
        "(answers scored).",
        "",
    ]
    lines += _section(report, "Overall", ["all skills"], lambda s: {"all skills": s.overall})
    skills = [k for k in SKILLS if any(s.skills[k].n for s in report.systems)]
    lines += _section(report, "Skill", skills, lambda s: s.skills)
    domains = sorted({d for s in report.systems for d in s.domains})
    lines += _section(report, "Domain", domains, lambda s: s.domains)
    levels = sorted({d for s in report.systems for d in s.difficulties})
    lines += _section(report, "Difficulty", levels, lambda s: s.difficulties)
    counts = [
        [cell(s.name), str(s.answered), str(s.unanswered), str(s.unparseable), str(s.failed_calls)]
        for s in report.systems
    ]
    lines += table(
        ["Answers", "Graded", "Items without an answer", "Unreadable scores", "Failed judge calls"],
        counts,
    )
    for name, skipped in report.skipped.items():
        for reason, n in skipped.items():
            lines.append(f"\nRecords of {cell(name)} set aside ({cell(reason)}): {n}.")
    return "\n".join(lines) + "\n"


def _mean_json(score: MeanScore) -> dict[str, Any]:
    return {
        "mean": None if score.mean is None else round(score.mean, 4),
        "standard_error": None if score.standard_error is None else round(score.standard_error, 4),
        "n": score.n,
    }


def flask_json(report: FlaskReport) -> dict[str, Any]:
    return {
        "kind": "flask",
        "judge": report.judge,
        "items_file": report.items_path,
        "items": report.items,
        "systems": [
            {
                "name": s.name,
                "overall": _mean_json(s.overall),
                "skills": {k: _mean_json(v) for k, v in s.skills.items() if v.n},
                "domains": {k: _mean_json(v) for k, v in s.domains.items()},
                "difficulties": {k: _mean_json(v) for k, v in s.difficulties.items()},
                "answered": s.answered,
                "unanswered": s.unanswered,
                "unreadable_scores": s.unparseable,
                "failed_judge_calls": s.failed_calls,
            }
            for s in report.systems
        ],
        "skipped": report.skipped,
        "grades": [
            {
                "system": g.system,
                "id": g.item.id,
                "scores": g.scores,
                "problem": g.problem,
                "failed": g.failed,
                "judge_output": g.judge_output,
            }
            for g in report.grades
        ],
    }
