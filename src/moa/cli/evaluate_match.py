"""`moa eval match`: accuracy of short answers against reference answers; no judge needed."""

from __future__ import annotations

from pathlib import Path

import click

from moa.cli.evaluate import command
from moa.cli.options import FILE
from moa.cli.report import finish_report, report_options
from moa.evaluation.accuracy import compare, load_references, load_scored
from moa.evaluation.match_report import match_json, match_markdown
from moa.evaluation.plots import plot_match
from moa.evaluation.scoring import MATCH_MODES, MatchMode

__all__ = ["match"]


@command.command()
@click.argument("answers_path", metavar="ANSWERS", type=FILE)
@click.argument("other_path", metavar="[OTHER]", required=False, type=FILE)
@click.option(
    "--reference",
    "reference_path",
    type=FILE,
    help="The input rows carrying `answer`/`answers` (matched by id), when ANSWERS does not.",
)
@click.option(
    "--match",
    "mode",
    type=click.Choice(MATCH_MODES),
    default="auto",
    show_default=True,
    help="exact: the whole answer; numeric: the answer's number; contains: the accepted answer "
    "as whole words; auto: numeric for numbers, contains otherwise.",
)
@click.option("--name-a", help="What to call ANSWERS (default: its generator or file name).")
@click.option("--name-b", help="What to call OTHER.")
@report_options(
    "every row's output and verdict included", chart="accuracy per category with error bars"
)
def match(
    answers_path: Path,
    other_path: Path | None,
    reference_path: Path | None,
    mode: MatchMode,
    name_a: str | None,
    name_b: str | None,
    output_json: Path | None,
    plot: Path | None,
) -> None:
    """Accuracy of `moa batch` output against reference answers; no judge needed.

    Each row's accepted answers are `answers` (a list) or `answer` in the input row, which
    `moa batch` keeps in its output (or in --reference ROWS). Accuracy comes with its standard
    error, per `category` when rows have one; a row whose run failed counts as wrong. Given
    OTHER, a second output of the same rows, it also compares the two row by row: the rows
    that flipped and an exact McNemar test.
    """
    references = load_references(reference_path) if reference_path is not None else None
    systems = [load_scored(answers_path, mode=mode, name=name_a, references=references)]
    if other_path is not None:
        systems.append(load_scored(other_path, mode=mode, name=name_b, references=references))
    paired = compare(systems[0], systems[1]) if len(systems) == 2 else None
    finish_report(
        match_markdown(systems, paired),
        match_json(systems, paired),
        output_json=output_json,
        plot=plot,
        draw=lambda path: plot_match(systems, path),
    )
