"""Plots of evaluation reports (the `[plot]` extra, matplotlib): `--plot FILE` on `moa eval`.

- FLASK: a radar chart of the twelve skills, one polygon per answer file, as the FLASK and
  MoA papers draw them;
- MT-Bench: mean score per category, one bar per model;
- pairwise: the win rate (raw, and length-controlled when computed) with error bars;
- match: accuracy overall and per category, one bar per answer file, with error bars.

The file's suffix picks the format (.png, .svg, .pdf). Figures are drawn off-screen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moa.errors import InvalidRequest, MissingExtraError
from moa.evaluation.accuracy import ScoredSystem
from moa.evaluation.flask import SKILLS, FlaskReport
from moa.evaluation.length_control import LengthControlled
from moa.evaluation.mt_bench import MTBenchReport
from moa.evaluation.pairwise import PairwiseReport

__all__ = ["check_plot_path", "plot_flask", "plot_match", "plot_mt_bench", "plot_pairwise"]

_FORMATS = (".png", ".svg", ".pdf")


def _pyplot(path: Path) -> Any:
    if path.suffix.lower() not in _FORMATS:
        raise InvalidRequest(
            f"--plot {path}: unknown image format {path.suffix or '(no suffix)'}; "
            f"end the name with one of {', '.join(_FORMATS)}"
        )
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("--plot", "plot", "matplotlib") from None
    matplotlib.use("Agg")  # no display needed, and none is used
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    """Fail now, not after the judging, on a bad suffix or a missing [plot] extra."""
    _pyplot(path)


def _save(plt: Any, figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_flask(report: FlaskReport, path: Path) -> None:
    """A radar of the mean 1-5 score per skill; skills no system was scored on are left out."""
    plt = _pyplot(path)
    skills = [s for s in SKILLS if any(sys.skills[s].mean is not None for sys in report.systems)]
    if len(skills) < 3:  # a polygon needs three corners; bars say the same for fewer
        skills = list(SKILLS)
    angles = [2 * math.pi * i / len(skills) for i in range(len(skills))]
    figure = plt.figure(figsize=(7, 7))
    axes = figure.add_subplot(projection="polar")
    for system in report.systems:
        values = [system.skills[s].mean or 0.0 for s in skills]
        axes.plot([*angles, angles[0]], [*values, values[0]], linewidth=1.8, label=system.name)
        axes.fill([*angles, angles[0]], [*values, values[0]], alpha=0.12)
    axes.set_xticks(angles)
    axes.set_xticklabels([s.replace(" ", "\n") for s in skills], fontsize=8)
    axes.tick_params(axis="x", pad=10)
    axes.set_rlabel_position(180 / len(skills))  # the 1-5 labels between two skills' spokes
    axes.set_ylim(0, 5)
    axes.set_yticks([1, 2, 3, 4, 5])
    axes.set_title(f"FLASK skills (1-5), judge {report.judge}", fontsize=10, pad=18)
    axes.legend(loc="upper right", bbox_to_anchor=(1.25, 1.12), fontsize=8)
    _save(plt, figure, path)


def plot_mt_bench(report: MTBenchReport, path: Path) -> None:
    """Mean score per category (all turns), one bar per model."""
    plt = _pyplot(path)
    categories = sorted({c.category for m in report.models for c in m.categories})
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(categories) + 2), 4.5))
    width = 0.8 / max(1, len(report.models))
    for number, model in enumerate(report.models):
        by_category = {c.category: c.all_turns.mean for c in model.categories}
        positions = [i + number * width for i in range(len(categories))]
        values = [by_category.get(c) or 0.0 for c in categories]
        axes.bar(positions, values, width=width, label=model.model)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))])
    axes.set_xticklabels(categories, rotation=30, ha="right")
    axes.set_ylim(0, 10)
    axes.set_ylabel("mean score (1-10)")
    axes.set_title(f"MT-Bench by category, judge {report.judge}", fontsize=10)
    axes.legend(fontsize=8)
    _save(plt, figure, path)


def plot_pairwise(
    report: PairwiseReport, path: Path, controlled: LengthControlled | None = None
) -> None:
    """A's win rate over B in percent, ± one standard error; 50 % dashed."""
    plt = _pyplot(path)
    summary = report.summary
    labels, values, errors = (
        ["raw"],
        [100 * (summary.win_rate or 0.0)],
        [100 * (summary.standard_error or 0.0)],
    )
    if controlled is not None:
        labels.append("length-controlled")
        values.append(100 * controlled.win_rate)
        errors.append(100 * (controlled.standard_error or 0.0))
    figure, axes = plt.subplots(figsize=(max(4.5, 1.6 * len(labels) + 1.5), 4))
    axes.bar(range(len(labels)), values, yerr=errors, capsize=6, color="#4c78a8")
    axes.axhline(50.0, color="grey", linewidth=1, linestyle="--")
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels)
    axes.set_ylim(0, 100)
    axes.set_ylabel("win rate (%)")
    axes.set_title(f"{report.a.name} over {report.b.name}, judge {report.judge}", fontsize=10)
    _save(plt, figure, path)


def plot_match(systems: Sequence[ScoredSystem], path: Path) -> None:
    """Accuracy in percent, overall and per category, ± one standard error."""
    plt = _pyplot(path)
    groups = ["overall", *sorted({c.category for s in systems for c in s.categories})]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.0 * len(groups) * len(systems) + 2), 4.5))
    width = 0.8 / max(1, len(systems))
    for number, system in enumerate(systems):
        scores = {"overall": system.overall, **{c.category: c for c in system.categories}}
        positions = [i + number * width for i in range(len(groups))]
        values = [100 * scores[g].accuracy if g in scores else 0.0 for g in groups]
        errors = [100 * scores[g].standard_error if g in scores else 0.0 for g in groups]
        axes.bar(positions, values, width=width, yerr=errors, capsize=4, label=system.name)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    axes.set_xticklabels(groups, rotation=30, ha="right")
    axes.set_ylim(0, 100)
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Accuracy against reference answers", fontsize=10)
    axes.legend(fontsize=8)
    _save(plt, figure, path)
