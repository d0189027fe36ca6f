"""How every `moa eval` command ends: the report as Markdown on stdout, and on request as JSON
(--output-json) and as a chart (--plot); failed judge calls are a warning, and a report with
nothing scored is an error (exit 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import click

from moa.cli.options import FILE, Decorator, options
from moa.errors import EvaluationFailed
from moa.evaluation.plots import check_plot_path
from moa.evaluation.report import write_json

__all__ = ["finish_report", "report_options"]


def _checked_plot(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    if path is not None:
        check_plot_path(path)  # a bad suffix or a missing extra fails now, not after the judging
    return path


def report_options(contents: str, chart: str = "the report as a chart") -> Decorator[Any]:
    """--output-json and --plot; `contents` says what the JSON keeps beyond the Markdown."""
    return options(
        click.option(
            "--output-json",
            type=FILE,
            help=f"Also write the full report, {contents}, as JSON here.",
        ),
        click.option(
            "--plot",
            type=FILE,
            callback=_checked_plot,
            help=f"Also draw {chart} here (.png, .svg or .pdf; needs the [plot] extra).",
        ),
    )


class Judged(Protocol):
    """One judge call's outcome in a report (a verdict, a grade)."""

    @property
    def failed(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...


def finish_report(
    markdown: str,
    data: dict[str, Any],
    *,
    output_json: Path | None,
    plot: Path | None,
    draw: Callable[[Path], None],
    judged: Sequence[Judged] = (),
    scored: bool = True,
    nothing: str = "nothing could be scored",
    unreadable: str = "replies unreadable",
    unmatched: str = "",
) -> None:
    """Show and save the report; warn about the judge calls that failed; when nothing was
    `scored`, raise EvaluationFailed saying `nothing`, with the failed and the `unreadable`
    replies counted (and `unmatched` when nothing was judged at all)."""
    click.echo(markdown, nl=False)
    if output_json is not None:
        write_json(output_json, data)
    if plot is not None:
        draw(plot)
    failures = [j.problem for j in judged if j.failed]
    if failures:
        first = f" (first: {failures[0]})" if failures[0] else ""
        s = "s" if len(failures) > 1 else ""
        click.echo(f"warning: {len(failures)} judge call{s} failed{first}", err=True)
    if not scored:
        why = f"{len(failures)} judge calls failed, {len(judged) - len(failures)} {unreadable}"
        raise EvaluationFailed(f"{nothing} ({why}{'' if judged else '; ' + unmatched})")
