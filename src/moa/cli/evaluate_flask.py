"""`moa eval flask`: FLASK fine-grained grading of one or more answer files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import Progress

from moa.cli.evaluate import JudgeOptions, _progress_hooks, _run_judged, _warn_failures, command
from moa.cli.evaluate import judge_options as _judge_options
from moa.evaluation import EvaluationFailed, write_json
from moa.evaluation.flask import FlaskReport, evaluate_flask, load_flask_answers, load_flask_items
from moa.evaluation.flask_report import flask_json, flask_markdown
from moa.evaluation.judges import Judge
from moa.evaluation.plots import check_plot_path, plot_flask

__all__ = ["flask"]


@command.command("flask")
@click.argument(
    "answers_paths",
    metavar="ANSWERS...",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option(
    "-q",
    "--questions",
    "items_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The FLASK evaluation rows (flask_evaluation.jsonl: id, instruction, reference "
    "answer, skills, domain, difficulty).",
)
@_judge_options
@click.option("--limit", type=click.IntRange(min=1), help="Grade only the first N items.")
@click.option(
    "--output-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the full report, every judge reply included, as JSON here.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw a radar chart of the skills here (.png, .svg or .pdf; needs the [plot] extra).",
)
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
    options = JudgeOptions(**judge)
    if plot is not None:
        check_plot_path(plot)
    items = load_flask_items(items_path)
    systems = []
    names: set[str] = set()
    for path in answers_paths:
        answers = load_flask_answers(path, items)
        name, number = answers.name, 2
        while name in names:  # two files from one generator still need two columns
            name, number = f"{answers.name} ({number})", number + 1
        names.add(name)
        systems.append(load_flask_answers(path, items, name))

    async def work(judge: Judge, progress: Progress | None) -> FlaskReport:
        on_start, on_done = _progress_hooks(progress)
        return await evaluate_flask(
            judge,
            items,
            systems,
            items_path=str(items_path),
            limit=limit,
            on_start=on_start,
            on_done=on_done,
        )

    report = _run_judged(options, work)
    click.echo(flask_markdown(report), nl=False)
    if output_json is not None:
        write_json(output_json, flask_json(report))
    if plot is not None:
        plot_flask(report, plot)
    failures = [g for g in report.grades if g.failed]
    _warn_failures(len(failures), failures[0].problem if failures else None)
    if not any(g.mean is not None for g in report.grades):
        raise EvaluationFailed(
            f"no answer could be scored: {len(failures)} judge calls failed, "
            f"{sum(g.problem is not None and not g.failed for g in report.grades)} replies "
            "without readable scores" + ("" if report.grades else " (no answer matches an item id)")
        )
