"""`moa eval flask`: FLASK fine-grained grading of one or more answer files."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import click

from moa.cli.evaluate import JudgeOptions, _run_judged, command
from moa.cli.evaluate import judge_options as _judge_options
from moa.cli.options import FILE
from moa.cli.report import finish_report, report_options
from moa.evaluation.flask import evaluate_flask, load_flask_answers, load_flask_items
from moa.evaluation.flask_report import flask_json, flask_markdown
from moa.evaluation.plots import plot_flask

__all__ = ["flask"]


@command.command("flask")
@click.argument(
    "answers_paths",
    metavar="ANSWERS...",
    nargs=-1,
    required=True,
    type=FILE,
)
@click.option(
    "-q",
    "--questions",
    "items_path",
    required=True,
    type=FILE,
    help="The FLASK evaluation rows (flask_evaluation.jsonl: id, instruction, reference "
    "answer, skills, domain, difficulty).",
)
@_judge_options
@click.option("--limit", type=click.IntRange(min=1), help="Grade only the first N items.")
@report_options("every judge reply included", chart="a radar chart of the skills")
def flask(
    answers_paths: tuple[Path, ...],
    items_path: Path,
    limit: int | None,
    output_json: Path | None,
    plot: Path | None,
    **judge: Any,
) -> None:
    """Score answers 1-5 on each FLASK item's skills, per skill, domain and difficulty.

    Each ANSWERS file is FLASK model output (question_id, text), `moa batch` output, or
    AlpacaEval model outputs; give several to compare them side by side. The judge sees the
    instruction, the reference answer and the response, and scores each of the item's skills
    with a rubric per skill.
    """
    items = load_flask_items(items_path)
    systems = []
    names: set[str] = set()
    for path in answers_paths:
        answers = load_flask_answers(path, items)
        name, number = answers.name, 2
        while name in names:  # two files from one generator still need two columns
            name, number = f"{answers.name} ({number})", number + 1
        names.add(name)
        systems.append(replace(answers, name=name))
    report = _run_judged(
        JudgeOptions(**judge),
        partial(
            evaluate_flask, items=items, systems=systems, items_path=str(items_path), limit=limit
        ),
    )
    finish_report(
        flask_markdown(report),
        flask_json(report),
        output_json=output_json,
        plot=plot,
        draw=lambda path: plot_flask(report, path),
        judged=report.grades,
        scored=any(g.mean is not None for g in report.grades),
        nothing="no answer could be scored",
        unreadable="replies without readable scores",
        unmatched="no answer matches an item id",
    )
