"""Evaluation with LLM judges: pairwise win rates (AlpacaEval-style) and MT-Bench grading.

    from moa.evaluation import Judge, evaluate_pairwise, load_outputs, pairwise_markdown

    judge = Judge(provider, Agent(provider="openai", model="gpt-4.1", temperature=0.0))
    report = await evaluate_pairwise(judge, load_outputs(a_path), load_outputs(b_path))
    print(pairwise_markdown(report))

The judge is any `Provider` plus an `Agent` saying which model to ask (a whole MoA pipeline
works too, through `MoA.as_provider()`); build it with a call cache
(`moa.providers.build_providers(..., cache=)`, `MoA.from_config(..., cache=)`) to make a rerun
free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from moa.errors import EvaluationFailed, InputFileError
from moa.evaluation.inputs import (
    OutputSet,
    load_answers,
    load_outputs,
    load_questions,
    load_reference_answers,
    match_outputs,
)
from moa.evaluation.judges import Judge, JudgeReply, parse_grade, parse_pair_verdict
from moa.evaluation.mt_bench import (
    ModelAnswer,
    MTBenchReport,
    Question,
    grade_answers,
    plan_grading,
)
from moa.evaluation.mt_bench import summarize as summarize_grades
from moa.evaluation.pairwise import PairwiseReport, SystemInfo, judge_pairs, win_rate
from moa.evaluation.pairwise import summarize as summarize_pairs
from moa.evaluation.report import (
    mt_bench_json,
    mt_bench_markdown,
    pairwise_json,
    pairwise_markdown,
    write_json,
)

__all__ = [
    "EvaluationFailed",
    "InputFileError",
    "Judge",
    "JudgeReply",
    "MTBenchReport",
    "PairwiseReport",
    "evaluate_mt_bench",
    "evaluate_pairwise",
    "load_answers",
    "load_outputs",
    "load_questions",
    "load_reference_answers",
    "mt_bench_json",
    "mt_bench_markdown",
    "pairwise_json",
    "pairwise_markdown",
    "parse_grade",
    "parse_pair_verdict",
    "win_rate",
    "write_json",
]


async def evaluate_pairwise(
    judge: Judge,
    a: OutputSet,
    b: OutputSet,
    *,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> PairwiseReport:
    """Match A's and B's rows, judge each item in both orders, and summarize.

    `on_start(total)` is told how many verdicts are coming, `on_done(n)` as they settle.
    Raises InputFileError when the two files have no item in common.
    """
    matching = match_outputs(a, b)
    if not matching.items:
        raise InputFileError(
            f"{a.path} and {b.path}: no item in common (matched by {matching.by}); "
            "are they answers to the same prompts?"
        )
    items = matching.items[:limit] if limit is not None else matching.items
    if on_start is not None:
        on_start(2 * len(items))
    results = await judge_pairs(judge, items, on_done=on_done)
    return PairwiseReport(
        a=SystemInfo(a.name, str(a.path), len(a.rows), matching.unmatched_a, a.skipped),
        b=SystemInfo(b.name, str(b.path), len(b.rows), matching.unmatched_b, b.skipped),
        judge=judge.label,
        matched_by=matching.by,
        results=tuple(results),
        summary=summarize_pairs(results),
        prompt_mismatches=matching.prompt_mismatches,
        turn_mismatches=matching.turn_mismatches,
    )


async def evaluate_mt_bench(
    judge: Judge,
    questions: Mapping[str, Question],
    answers: Sequence[ModelAnswer],
    *,
    answers_path: str = "",
    questions_path: str = "",
    limit: int | None = None,
    skipped_answers: Mapping[str, int] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> MTBenchReport:
    """Grade every turn of every answer (the first `limit` questions only, if given)."""
    if limit is not None:
        kept = dict(list(questions.items())[:limit])
        # Answers to the questions cut by the limit are not "unknown": leave them out quietly.
        answers = [a for a in answers if a.question_id in kept or a.question_id not in questions]
        questions = kept
    plan = plan_grading(questions, answers)
    if on_start is not None:
        on_start(len(plan.jobs))
    grades = await grade_answers(judge, plan, on_done=on_done)
    turns = max(len(q.turns) for q in questions.values())
    return MTBenchReport(
        judge=judge.label,
        answers_path=answers_path,
        questions_path=questions_path,
        questions=len(questions),
        turns=turns,
        models=tuple(summarize_grades(grades, plan, turns)),
        grades=tuple(grades),
        unknown_questions=plan.unknown_questions,
        duplicates=plan.duplicates,
        skipped_answers=dict(skipped_answers or {}),
    )
