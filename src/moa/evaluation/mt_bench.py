"""MT-Bench-style single-answer grading: every turn of every answer graded 1-10 by a judge.

The judge grading turn 2 sees the whole exchange (question 1, answer 1, question 2, answer 2),
because a follow-up answer means nothing without what came before. Scores are averaged per
category (over all graded turns, and per turn) and overall, for each model in the answers.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from moa.evaluation.judges import Judge, ParsedGrade, grading_messages, parse_grade

__all__ = [
    "CategoryScores",
    "GradingPlan",
    "MTBenchReport",
    "ModelAnswer",
    "ModelSummary",
    "Question",
    "Score",
    "TurnGrade",
    "grade_answers",
    "plan_grading",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    category: str
    turns: tuple[str, ...]
    #: Reference answers per turn, where the benchmark has them (math, reasoning, coding).
    reference: tuple[str | None, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    question_id: str
    model: str
    turns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TurnGrade:
    """One graded turn; the report's JSON keeps it field by field, in this order."""

    model: str
    question_id: str
    category: str
    #: 1-based.
    turn: int
    #: None when the call failed or the grade was unreadable.
    score: float | None
    problem: str | None = None
    failed: bool = False
    judge_output: str = ""


@dataclass(frozen=True, slots=True)
class GradingPlan:
    """Which turns to grade, and what could not be matched up."""

    jobs: tuple[tuple[ModelAnswer, Question, int], ...]
    #: Per model: questions it has no answer to.
    unanswered: dict[str, int]
    #: Per model: question turns its answers stop short of.
    missing_turns: dict[str, int]
    #: Answers to question ids not in the questions file.
    unknown_questions: int
    #: Further answers to a (model, question) already answered; the first one is graded.
    duplicates: int


def plan_grading(questions: Mapping[str, Question], answers: Sequence[ModelAnswer]) -> GradingPlan:
    jobs: list[tuple[ModelAnswer, Question, int]] = []
    seen: set[tuple[str, str]] = set()
    unknown = duplicates = 0
    missing: dict[str, int] = {}
    models: list[str] = []
    for answer in answers:
        if answer.model not in models:
            models.append(answer.model)
        question = questions.get(answer.question_id)
        if question is None:
            unknown += 1
            continue
        if (answer.model, answer.question_id) in seen:
            duplicates += 1
            continue
        seen.add((answer.model, answer.question_id))
        reached = min(len(question.turns), len(answer.turns))
        missing[answer.model] = missing.get(answer.model, 0) + len(question.turns) - reached
        jobs.extend((answer, question, turn) for turn in range(1, reached + 1))
    unanswered = {model: sum((model, qid) not in seen for qid in questions) for model in models}
    return GradingPlan(
        jobs=tuple(jobs),
        unanswered=unanswered,
        missing_turns={model: missing.get(model, 0) for model in models},
        unknown_questions=unknown,
        duplicates=duplicates,
    )


async def _grade(judge: Judge, answer: ModelAnswer, question: Question, turn: int) -> TurnGrade:
    messages = grading_messages(question.turns, answer.turns, turn, question.reference)
    reply = await judge.ask(messages)
    grade = ParsedGrade(None, reply.error) if reply.failed else parse_grade(reply.text)
    return TurnGrade(
        model=answer.model,
        question_id=question.id,
        category=question.category,
        turn=turn,
        score=grade.score,
        judge_output=reply.text,
        problem=grade.problem,
        failed=reply.failed,
    )


async def grade_answers(
    judge: Judge, plan: GradingPlan, *, on_done: Callable[[int], None] | None = None
) -> list[TurnGrade]:
    """Grade every planned turn, `judge`'s concurrency at a time; results in plan order."""

    async def one(job: tuple[ModelAnswer, Question, int]) -> TurnGrade:
        grade = await _grade(judge, *job)
        if on_done is not None:
            on_done(1)
        return grade

    return list(await asyncio.gather(*(one(job) for job in plan.jobs)))


@dataclass(frozen=True, slots=True)
class Score:
    mean: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Score:
        return cls(statistics.fmean(values) if values else None, len(values))


@dataclass(frozen=True, slots=True)
class CategoryScores:
    category: str
    #: One per turn number (turn 1 first).
    turns: tuple[Score, ...]
    #: Over every graded turn of the category, as MT-Bench averages.
    all_turns: Score


@dataclass(frozen=True, slots=True)
class ModelSummary:
    model: str
    categories: tuple[CategoryScores, ...]
    overall: CategoryScores
    unparseable: int
    failed_calls: int
    unanswered: int
    missing_turns: int


def _scores(grades: Sequence[TurnGrade], name: str, turns: int) -> CategoryScores:
    read = [(g.turn, g.score) for g in grades if g.score is not None]
    return CategoryScores(
        category=name,
        turns=tuple(Score.of([s for t, s in read if t == turn]) for turn in range(1, turns + 1)),
        all_turns=Score.of([s for _, s in read]),
    )


def summarize(grades: Sequence[TurnGrade], plan: GradingPlan, turns: int) -> list[ModelSummary]:
    """Per model: scores by category (alphabetical) and overall, plus what went unscored."""
    summaries: list[ModelSummary] = []
    for model in plan.unanswered:
        mine = [g for g in grades if g.model == model]
        categories = sorted({g.category for g in mine})
        summaries.append(
            ModelSummary(
                model=model,
                categories=tuple(
                    _scores([g for g in mine if g.category == c], c, turns) for c in categories
                ),
                overall=_scores(mine, "overall", turns),
                unparseable=sum(g.score is None and not g.failed for g in mine),
                failed_calls=sum(g.failed for g in mine),
                unanswered=plan.unanswered[model],
                missing_turns=plan.missing_turns[model],
            )
        )
    return summaries


@dataclass(frozen=True, slots=True)
class MTBenchReport:
    judge: str
    answers_path: str
    questions_path: str
    questions: int
    turns: int
    models: tuple[ModelSummary, ...]
    grades: tuple[TurnGrade, ...]
    unknown_questions: int = 0
    duplicates: int = 0
    #: Records of the answers file that are not answers, by reason.
    skipped_answers: dict[str, int] = field(default_factory=dict)
