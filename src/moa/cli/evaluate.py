"""`moa eval pairwise` and `moa eval mt-bench`: judge outputs with any agent as the judge.

The judge is one model (`--judge PROVIDER/MODEL`, providers from `--config` or the built-in
ones) or a whole MoA pipeline (`--judge-preset`, `--judge-pipeline`). Its calls go through the
call cache unless `--no-cache`, so rerunning an evaluation makes no calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click

from moa.batch.progress import CountBar
from moa.cli.options import (
    FILE,
    cache_file,
    cache_options,
    config_option,
    env_file_option,
    environment,
    options,
)
from moa.cli.report import finish_report, report_options
from moa.config import Agent, ProviderConfig, load_config, load_providers, resolve_agent
from moa.engine import MoA
from moa.env import Environment
from moa.errors import ConfigError
from moa.evaluation import (
    evaluate_mt_bench,
    evaluate_pairwise,
    load_answers,
    load_outputs,
    load_questions,
    load_reference_answers,
    mt_bench_json,
    mt_bench_markdown,
    pairwise_json,
    pairwise_markdown,
)
from moa.evaluation.judges import Judge
from moa.evaluation.length_control import length_controlled as fit_from_results
from moa.evaluation.length_control import length_controlled_json, length_controlled_markdown
from moa.evaluation.plots import plot_mt_bench, plot_pairwise
from moa.presets import PRESETS, preset_config
from moa.providers import build_providers
from moa.providers.cache import CallCache

__all__ = ["command"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Room for a few sentences of reasons before the verdict line.
DEFAULT_JUDGE_MAX_TOKENS = 1024
DEFAULT_CONCURRENCY = 8
#: A pipeline judge makes several calls per verdict, and retries its own agents; one retry of
#: the whole pipeline is plenty, with a deadline that leaves room for its layers.
PIPELINE_JUDGE_TIMEOUT_S = 900.0
PIPELINE_JUDGE_ATTEMPTS = 2


@dataclass(frozen=True, slots=True)
class JudgeOptions:
    judge: str | None
    judge_preset: str | None
    judge_pipeline: str | None
    config_path: Path | None
    env_file: Path | None
    judge_max_tokens: int
    concurrency: int
    cache_path: Path | None
    no_cache: bool


def judge_options(func: F) -> F:
    """The options every judged evaluation shares: who judges, how many calls at once, the
    cache."""
    return options(
        click.option(
            "--judge",
            metavar="PROVIDER/MODEL",
            help="Judge with one model, e.g. openai/gpt-4.1. PROVIDER is a name under "
            "`providers:` in --config; without --config, one of the built-in providers "
            f"({', '.join(_builtin_provider_names())}).",
        ),
        click.option(
            "--judge-preset",
            metavar="NAME",
            help="Judge with a whole MoA pipeline: a preset (see `moa presets`).",
        ),
        click.option(
            "--judge-pipeline",
            metavar="NAME",
            help="Judge with a whole MoA pipeline defined in --config (`moa` for a config's "
            "inline pipeline).",
        ),
        config_option(
            "A YAML file whose `providers:` --judge names (it needs no pipeline), or whose "
            "pipelines --judge-pipeline names."
        ),
        env_file_option(),
        click.option(
            "--judge-max-tokens",
            type=click.IntRange(min=16),
            default=DEFAULT_JUDGE_MAX_TOKENS,
            show_default=True,
            help="Longest judge reply (a single-model judge answers at temperature 0).",
        ),
        click.option(
            "--concurrency",
            type=click.IntRange(min=1),
            default=DEFAULT_CONCURRENCY,
            show_default=True,
            help="Judge calls in flight at once.",
        ),
        cache_options,
    )(func)


def _builtin_providers() -> dict[str, ProviderConfig]:
    """The providers the presets use (local, together, groq, openai), usable by --judge."""
    providers: dict[str, ProviderConfig] = {}
    for name in PRESETS:
        providers.update(preset_config(name).providers)
    return providers


def _builtin_provider_names() -> list[str]:
    names: list[str] = []
    for preset in PRESETS.values():
        names.extend(n for n in preset.get("providers", {}) if n not in names)
    return names


def _split_judge(spec: str, providers: dict[str, ProviderConfig], source: str) -> tuple[str, str]:
    provider, sep, model = spec.partition("/")
    if not sep:
        if len(providers) != 1:
            raise ConfigError(
                f"--judge {spec!r}: name the provider too, as PROVIDER/MODEL "
                f"(providers in {source}: {', '.join(sorted(providers))})"
            )
        return next(iter(providers)), spec
    if provider not in providers or not model:
        raise ConfigError(
            f"--judge {spec!r}: expected PROVIDER/MODEL with PROVIDER one of "
            f"{', '.join(sorted(providers))} (from {source})"
        )
    return provider, model


def _single_judge(options: JudgeOptions, cache: CallCache | None) -> Judge:
    assert options.judge is not None
    if options.config_path is not None:
        providers, env_file = load_providers(options.config_path)
        source = str(options.config_path)
    else:
        providers, env_file, source = _builtin_providers(), None, "the built-in providers"
    name, model = _split_judge(options.judge, providers, source)
    env = Environment(env_file=options.env_file or env_file)
    agent = resolve_agent(
        providers, provider=name, model=model, temperature=0.0, max_tokens=options.judge_max_tokens
    )
    provider = build_providers(providers, [name], env, cache=cache)[name]
    return Judge(provider, agent, concurrency=options.concurrency, label=f"{name}/{model}")


def _pipeline_judge(options: JudgeOptions, cache: CallCache | None) -> Judge:
    """A whole pipeline as the judge. Its agents' calls are cached like any others; the judge's
    temperature 0 and token cap reach its aggregator (MoA.with_answer_settings)."""
    pipeline: str | None
    if options.judge_preset is not None:
        config, pipeline = preset_config(options.judge_preset), None
        label = f"MoA preset {options.judge_preset}"
    else:
        if options.config_path is None:
            raise click.UsageError("--judge-pipeline names a pipeline of --config: give --config")
        config = load_config(options.config_path)
        pipeline = options.judge_pipeline
        label = f"MoA pipeline {pipeline}"
    env = environment(config, options.env_file)
    moa = MoA.from_config(config, pipeline, env=env, cache=cache)
    agent = Agent(
        provider=label,
        model=label,
        temperature=0.0,
        max_tokens=options.judge_max_tokens,
        timeout=PIPELINE_JUDGE_TIMEOUT_S,
        max_attempts=PIPELINE_JUDGE_ATTEMPTS,
    )
    return Judge(moa.as_provider(label), agent, concurrency=options.concurrency, label=label)


def _open_judge(options: JudgeOptions, cache: CallCache | None) -> Judge:
    chosen = [o for o in (options.judge, options.judge_preset, options.judge_pipeline) if o]
    if len(chosen) != 1:
        raise click.UsageError(
            "choose the judge with exactly one of --judge PROVIDER/MODEL, --judge-preset NAME "
            "or --judge-pipeline NAME"
        )
    if options.judge is not None:
        return _single_judge(options, cache)
    if options.judge_preset is not None and options.config_path is not None:
        raise click.UsageError("--judge-preset takes no --config (did you mean --judge-pipeline?)")
    return _pipeline_judge(options, cache)


class _Evaluation(Protocol[T_co]):
    """An evaluation with its inputs bound (a `functools.partial`): it wants the judge and the
    progress hooks."""

    def __call__(
        self, judge: Judge, /, *, on_start: Callable[[int], None], on_done: Callable[[int], None]
    ) -> Awaitable[T_co]: ...


def _run_judged(options: JudgeOptions, evaluate: _Evaluation[T]) -> T:
    """`evaluate` with the judge (and cache) the judge `options` name and a progress bar on a
    terminal; closes all."""
    path = cache_file(options.cache_path, options.no_cache)
    with CallCache(path) if path is not None else contextlib.nullcontext() as cache:
        judge = _open_judge(options, cache)

        async def go() -> T:
            try:
                with CountBar("judging", sys.stderr) as bar:
                    return await evaluate(judge, on_start=bar.started, on_done=bar.done)
            finally:
                await judge.aclose()

        return asyncio.run(go())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Judge outputs with an LLM (pairwise win rates, MT-Bench grades) or score short
    answers against reference answers (match).

    The judge is one model (--judge PROVIDER/MODEL) or a MoA pipeline (--judge-preset,
    --judge-pipeline). Reports go to stdout as Markdown and, with --output-json, to a JSON file
    that keeps every judge reply. Judge calls are cached, so a rerun makes no calls.

    \b
    Examples:
      moa eval pairwise moa.jsonl baseline.json --judge openai/gpt-4.1
      moa eval pairwise a.jsonl b.jsonl --judge vllm/qwen2.5-72b -c judges.yaml
      moa eval mt-bench answers.jsonl -q question.jsonl --judge-preset together
      moa eval match answers.jsonl other.jsonl --output-json report.json
    """


@command.command()
@click.argument("a_path", metavar="A", type=FILE)
@click.argument("b_path", metavar="B", type=FILE)
@judge_options
@click.option("--name-a", help="What to call system A (default: its generator or file name).")
@click.option("--name-b", help="What to call system B.")
@click.option("--limit", type=click.IntRange(min=1), help="Judge only the first N matched items.")
@report_options("every verdict included")
@click.option(
    "--length-controlled",
    is_flag=True,
    help="Also report the length-controlled win rate, fitted on this judge's verdicts.",
)
def pairwise(
    a_path: Path,
    b_path: Path,
    name_a: str | None,
    name_b: str | None,
    limit: int | None,
    output_json: Path | None,
    length_controlled: bool,
    plot: Path | None,
    **judge: Any,
) -> None:
    """Win rate of A over B, as a judge sees it.

    A and B are `moa batch` output (JSONL rows with id, ok and output) or AlpacaEval model
    outputs (a JSON list with instruction, output, generator). Items are matched by id when
    both files have ids, else by instruction. Each item is judged twice, A's answer shown first
    and then B's, so a judge's preference for a position cancels out; ties count half. The
    win rate comes with its standard error over items.

    With --length-controlled, the win rate at equal answer lengths is fitted on the same
    verdicts (a logistic model with a length term, as length-controlled AlpacaEval does) and
    shown beside the raw one.
    """
    a = load_outputs(a_path, name_a)
    b = load_outputs(b_path, name_b)
    report = _run_judged(JudgeOptions(**judge), partial(evaluate_pairwise, a=a, b=b, limit=limit))
    markdown, data = pairwise_markdown(report), pairwise_json(report)
    controlled = fit_from_results(report.results) if length_controlled else None
    if length_controlled:
        markdown += length_controlled_markdown(controlled, report.judge)
        data["length_controlled"] = length_controlled_json(controlled)
    finish_report(
        markdown,
        data,
        output_json=output_json,
        plot=plot,
        draw=lambda path: plot_pairwise(report, path, controlled),
        judged=[j for r in report.results for j in r.judgments],
        scored=report.summary.scored > 0,
        nothing="no item could be scored: every item lacks a readable verdict",
        unreadable="verdicts unparseable",
    )


@command.command("mt-bench")
@click.argument("answers_path", metavar="ANSWERS", type=FILE)
@click.option(
    "-q",
    "--questions",
    "questions_path",
    required=True,
    type=FILE,
    help="The questions (MT-Bench question.jsonl: question_id, category, turns, reference).",
)
@click.option(
    "--reference-answers",
    type=FILE,
    help="Reference answers in model-answer format, shown to the judge for their questions.",
)
@judge_options
@click.option("--limit", type=click.IntRange(min=1), help="Grade only the first N questions.")
@report_options("every grade and judge reply included")
def mt_bench(
    answers_path: Path,
    questions_path: Path,
    reference_answers: Path | None,
    limit: int | None,
    output_json: Path | None,
    plot: Path | None,
    **judge: Any,
) -> None:
    """Grade every turn of ANSWERS 1-10 and average per category.

    ANSWERS is MT-Bench model-answer JSONL (question_id, model_id, choices[0].turns); several
    models in one file are reported separately. The judge grading turn 2 sees the whole
    two-turn exchange, and the reference answer where the question has one.
    """
    questions = load_questions(questions_path)
    if reference_answers is not None:
        questions = load_reference_answers(reference_answers, questions)
    answers, skipped = load_answers(answers_path)
    report = _run_judged(
        JudgeOptions(**judge),
        partial(
            evaluate_mt_bench,
            questions=questions,
            answers=answers,
            answers_path=str(answers_path),
            questions_path=str(questions_path),
            limit=limit,
            skipped_answers=skipped,
        ),
    )
    finish_report(
        mt_bench_markdown(report),
        mt_bench_json(report),
        output_json=output_json,
        plot=plot,
        draw=lambda path: plot_mt_bench(report, path),
        judged=report.grades,
        scored=any(g.score is not None for g in report.grades),
        nothing="no turn could be graded",
        unreadable="grades unparseable",
        unmatched="no answer matches a question id",
    )


# Subcommands kept in modules of their own register themselves on `command` when imported.
from moa.cli import evaluate_flask as _evaluate_flask  # noqa: E402, F401
from moa.cli import evaluate_match as _evaluate_match  # noqa: E402, F401
