"""Reports of an evaluation: a Markdown table for people, a JSON document for scripts.

The JSON keeps every judge reply, so an unparseable verdict or a surprising grade can be
looked at afterwards; the Markdown shows the numbers and every count of what went unscored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moa._files import write_atomically
from moa.evaluation.mt_bench import CategoryScores, MTBenchReport, Score
from moa.evaluation.pairwise import PairwiseReport

__all__ = [
    "cell",
    "mt_bench_json",
    "mt_bench_markdown",
    "pairwise_json",
    "pairwise_markdown",
    "percent",
    "table",
    "write_json",
]


def cell(text: str) -> str:
    """Text that cannot break a Markdown table row."""
    return " ".join(text.split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# --- pairwise -------------------------------------------------------------------------------


def pairwise_markdown(report: PairwiseReport) -> str:
    s = report.summary
    a, b = cell(report.a.name), cell(report.b.name)
    lines = [
        f"## Pairwise: {a} vs {b}",
        "",
        f"Judge: {cell(report.judge)}. Each item judged in both orders; ties count half; "
        f"items matched by {report.matched_by}.",
        "",
    ]
    lines += table(
        ["System", "Win rate (%)", "SE (%)", "Wins", "Ties", "Losses", "Items scored"],
        [
            [
                f"{a} over {b}",
                percent(s.win_rate),
                percent(s.standard_error),
                str(s.wins),
                str(s.ties),
                str(s.losses),
                str(s.scored),
            ]
        ],
    )
    consistency = f"{s.consistent} of {s.both_read}" if s.both_read else "n/a"
    first_shown = "n/a" if s.first_shown_rate is None else f"{100 * s.first_shown_rate:.1f} %"
    counts = [
        ["Items matched", str(s.items)],
        ["Identical answers (tie, not judged)", str(s.identical)],
        ["Verdicts read", str(s.verdicts)],
        ["Unparseable verdicts", str(s.unparseable)],
        ["Failed judge calls", str(s.failed_calls)],
        ["Items left out (a verdict missing)", str(s.incomplete)],
        ["Same winner in both orders", consistency],
        ["Decisive verdicts for the response shown first", first_shown],
        [f"Rows of {a} without a match", str(report.a.unmatched)],
        [f"Rows of {b} without a match", str(report.b.unmatched)],
    ]
    for side in (report.a, report.b):
        for reason, n in side.skipped.items():
            counts.append([f"Rows of {cell(side.name)} set aside: {cell(reason)}", str(n)])
    if report.prompt_mismatches:
        counts.append(
            ["Items whose prompts differ between the files", str(report.prompt_mismatches)]
        )
    lines += ["", *table(["Detail", "Count"], counts)]
    return "\n".join(lines) + "\n"


def pairwise_json(report: PairwiseReport) -> dict[str, Any]:
    s = report.summary
    return {
        "kind": "pairwise",
        "judge": report.judge,
        "a": asdict(report.a),
        "b": asdict(report.b),
        "matched_by": report.matched_by,
        "summary": {
            "win_rate": _round(s.win_rate),
            "standard_error": _round(s.standard_error),
            "items": s.items,
            "scored": s.scored,
            "wins": s.wins,
            "ties": s.ties,
            "losses": s.losses,
            "identical": s.identical,
            "verdicts": s.verdicts,
            "unparseable_verdicts": s.unparseable,
            "failed_judge_calls": s.failed_calls,
            "incomplete_items": s.incomplete,
            "consistent_items": s.consistent,
            "first_shown_rate": _round(s.first_shown_rate),
            "prompt_mismatches": report.prompt_mismatches,
            "turn_mismatches": report.turn_mismatches,
        },
        "items": [
            {
                "key": r.item.key,
                "score": r.score,
                "identical": r.item.identical,
                "judgments": [
                    {
                        "shown_first": "A" if j.order == "AB" else "B",
                        "choice": j.choice,
                        "winner": j.winner,
                        "problem": j.problem,
                        "failed": j.failed,
                        "judge_output": j.judge_output,
                    }
                    for j in r.judgments
                ],
            }
            for r in report.results
        ],
    }


# --- MT-Bench -------------------------------------------------------------------------------


def _score(score: Score) -> str:
    return "n/a" if score.mean is None else f"{score.mean:.2f}"


def _score_json(score: Score) -> dict[str, Any]:
    return {"mean": _round(score.mean), "n": score.n}


def _category_row(scores: CategoryScores, name: str) -> list[str]:
    return [
        name,
        *(_score(t) for t in scores.turns),
        _score(scores.all_turns),
        str(scores.all_turns.n),
    ]


def mt_bench_markdown(report: MTBenchReport) -> str:
    lines: list[str] = []
    turn_headers = [f"Turn {t}" for t in range(1, report.turns + 1)]
    for model in report.models:
        lines += [
            f"## MT-Bench: {cell(model.model)}",
            "",
            f"Judge: {cell(report.judge)}. Single-answer grading, 1-10 per turn.",
            "",
        ]
        rows = [_category_row(c, cell(c.category)) for c in model.categories]
        rows.append(_category_row(model.overall, "**overall**"))
        lines += table(["Category", *turn_headers, "Mean", "Graded turns"], rows)
        lines += [
            "",
            f"Unparseable grades: {model.unparseable}. Failed judge calls: "
            f"{model.failed_calls}. Questions without an answer: {model.unanswered}. "
            f"Turns the answers stop short of: {model.missing_turns}.",
            "",
        ]
    extra = []
    if report.unknown_questions:
        extra.append(f"Answers to questions not in the questions file: {report.unknown_questions}.")
    if report.duplicates:
        extra.append(
            f"Repeated answers to one question (the first was graded): {report.duplicates}."
        )
    for reason, n in report.skipped_answers.items():
        extra.append(f"Records of the answers file set aside ({cell(reason)}): {n}.")
    if extra:
        lines += [" ".join(extra), ""]
    return "\n".join(lines)


def _category_json(scores: CategoryScores) -> dict[str, Any]:
    return {
        "turns": [_score_json(t) for t in scores.turns],
        "mean": _round(scores.all_turns.mean),
        "graded": scores.all_turns.n,
    }


def mt_bench_json(report: MTBenchReport) -> dict[str, Any]:
    return {
        "kind": "mt-bench",
        "judge": report.judge,
        "answers": report.answers_path,
        "questions": report.questions_path,
        "question_count": report.questions,
        "unknown_questions": report.unknown_questions,
        "duplicate_answers": report.duplicates,
        "skipped_answers": dict(report.skipped_answers),
        "models": [
            {
                "model": m.model,
                "overall": _category_json(m.overall),
                "categories": {c.category: _category_json(c) for c in m.categories},
                "unparseable_grades": m.unparseable,
                "failed_judge_calls": m.failed_calls,
                "unanswered_questions": m.unanswered,
                "missing_turns": m.missing_turns,
            }
            for m in report.models
        ],
        "grades": [asdict(g) for g in report.grades],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write the report; a partial file is never left behind under the final name."""
    write_atomically(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
