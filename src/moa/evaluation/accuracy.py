"""`moa eval match`: accuracy of short answers against the reference answers of their rows.

    from moa.evaluation.accuracy import load_scored, compare, accuracy_markdown

    system = load_scored(Path("answers.jsonl"), mode="auto")
    print(accuracy_markdown([system]))

A `moa batch` output keeps each input row under `row`; the row's `answers` (a list of accepted
strings) or `answer` (one string, or a list) are the references, and its `category`, if any,
groups the report. With `reference=ROWS`, the references come from that input file instead,
matched by id (the same id rules as `moa batch`). A row whose batch run failed is scored as
wrong: leaving it out would reward failing on hard questions.

Accuracy comes with its standard error over rows, sqrt(p(1-p)/n). Two outputs on the same rows
are compared pairwise: the rows only one of them gets right ("flips"), the difference with its
paired standard error, and the exact McNemar test (a two-sided binomial test on the flips), the
probability of a split at least this uneven if both were equally good.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moa._files import nothing_usable, read_objects, read_records, record_id, system_name
from moa.errors import InputFileError
from moa.evaluation.scoring import MatchMode, is_correct

__all__ = [
    "CategoryAccuracy",
    "Paired",
    "Reference",
    "ScoredRow",
    "ScoredSystem",
    "compare",
    "load_references",
    "load_scored",
    "mcnemar_exact",
]

_OUTPUT_FORMAT = (
    "expected `moa batch` output: one JSON object per line with id, ok and output, the input "
    "row (with `answer` or `answers`) under `row`"
)
_ROWS_FORMAT = (
    "expected the batch input rows: JSON objects with an id (or none: numbered by position), "
    "the prompt and `answer` or `answers`"
)


@dataclass(frozen=True, slots=True)
class Reference:
    answers: tuple[str, ...]
    category: str
    question: str


@dataclass(frozen=True, slots=True)
class ScoredRow:
    id: str
    category: str
    question: str
    answers: tuple[str, ...]
    output: str
    correct: bool
    #: False when the batch run of the row failed (scored as wrong).
    ran: bool
    calls: int
    tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CategoryAccuracy:
    category: str
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def standard_error(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else 0.0


def _accuracy(category: str, rows: Sequence[ScoredRow]) -> CategoryAccuracy:
    return CategoryAccuracy(category, sum(r.correct for r in rows), len(rows))


@dataclass(frozen=True, slots=True)
class ScoredSystem:
    name: str
    path: str
    mode: MatchMode
    rows: tuple[ScoredRow, ...]
    #: Output records set aside, by reason (no reference answers, not a JSON object, ...).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Reference rows (from --reference) that the output has no record for.
    missing: int = 0

    @property
    def overall(self) -> CategoryAccuracy:
        return _accuracy("overall", self.rows)

    @property
    def categories(self) -> list[CategoryAccuracy]:
        names = sorted({r.category for r in self.rows})
        return [_accuracy(name, [r for r in self.rows if r.category == name]) for name in names]

    @property
    def failed(self) -> int:
        return sum(not r.ran for r in self.rows)

    def mean(self, attribute: Literal["calls", "tokens", "seconds"]) -> float:
        """Mean calls, tokens or seconds per row."""
        values = [float(getattr(r, attribute)) for r in self.rows]
        return statistics.fmean(values) if values else 0.0


@dataclass(frozen=True, slots=True)
class Paired:
    a: str
    b: str
    n: int
    both: int
    neither: int
    #: Ids right in A only, and in B only.
    a_only: tuple[str, ...]
    b_only: tuple[str, ...]
    #: Rows of either output without a counterpart in the other.
    unmatched: int

    @property
    def difference(self) -> float:
        """Accuracy of B minus accuracy of A, on the shared rows."""
        return (len(self.b_only) - len(self.a_only)) / self.n if self.n else 0.0

    @property
    def standard_error(self) -> float:
        """Of the difference: the standard error of the mean of per-row differences."""
        if self.n < 2:
            return 0.0
        diffs = [1.0] * len(self.b_only) + [-1.0] * len(self.a_only)
        diffs += [0.0] * (self.n - len(diffs))
        return statistics.stdev(diffs) / math.sqrt(self.n)

    @property
    def p_value(self) -> float:
        return mcnemar_exact(len(self.a_only), len(self.b_only))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail: float = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


# --- reading --------------------------------------------------------------------------------


def _answers(row: Mapping[str, Any]) -> tuple[str, ...] | str | None:
    """The accepted answers of a row; None if it has none, a message if they are malformed."""
    key = "answers" if "answers" in row else "answer" if "answer" in row else None
    if key is None:
        return None
    value = row[key]
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value)
        or not all(str(v).strip() for v in value)
    ):
        return f"`{key}` must be a non-empty string or a list of non-empty strings or numbers"
    return tuple(str(v) for v in value)


def _question(row: Mapping[str, Any]) -> str:
    for key in ("instruction", "prompt"):
        if isinstance(row.get(key), str):
            return str(row[key])
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[-1], str):
        return turns[-1]
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def _reference(row: Mapping[str, Any], where: str) -> Reference | None:
    answers = _answers(row)
    if answers is None:
        return None
    if isinstance(answers, str):
        raise InputFileError(f"{where}: {answers}")
    category = row.get("category")
    return Reference(
        answers=answers,
        category=category if isinstance(category, str) and category else "uncategorized",
        question=_question(row),
    )


def _row_id(record: Mapping[str, Any], position: int) -> str | None:
    """The id `moa batch` gives a row: `id`, else `question_id`, else its position."""
    return record_id(record.get("id", record.get("question_id", position)))


def load_references(path: Path) -> dict[str, Reference]:
    """Reference answers by row id from a batch input file."""
    references: dict[str, Reference] = {}
    for position, (where, record) in enumerate(read_objects(path, _ROWS_FORMAT)):
        row_id = _row_id(record, position)
        if row_id is None:
            raise InputFileError(f"{where}: `id` must be a string or an integer")
        reference = _reference(record, where)
        if reference is not None:
            references[row_id] = reference
    if not references:
        raise InputFileError(f"{path}: no row has `answer` or `answers`; {_ROWS_FORMAT}")
    return references


def _usage(record: Mapping[str, Any]) -> tuple[int, int, float]:
    """Calls, tokens and seconds a batch record spent on its row."""
    calls = 0
    for run in record.get("runs") or ():
        if not isinstance(run, Mapping):
            continue
        for layer in run.get("layers") or ():
            calls += sum(
                1
                for agent in layer
                if isinstance(agent, Mapping) and agent.get("status") != "cancelled"
            )
        aggregator = run.get("aggregator")
        # Strategies that pick without a model call leave the aggregator's usage at zero.
        if isinstance(aggregator, Mapping) and (aggregator.get("usage") or {}).get("total_tokens"):
            calls += 1
    usage = record.get("usage")
    tokens = usage.get("total_tokens", 0) if isinstance(usage, Mapping) else 0
    latency = record.get("latency_s", 0.0)
    return (
        calls,
        tokens if isinstance(tokens, int) else 0,
        float(latency) if isinstance(latency, int | float) else 0.0,
    )


def load_scored(
    path: Path,
    *,
    mode: MatchMode = "auto",
    name: str | None = None,
    references: Mapping[str, Reference] | None = None,
) -> ScoredSystem:
    """Score every record of a batch output; raises InputFileError if none can be scored."""
    rows: list[ScoredRow] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    generators: set[str] = set()

    for position, (line, record) in enumerate(read_records(path, _OUTPUT_FORMAT)):
        if not isinstance(record, Mapping):
            skipped["not a JSON object"] += 1
            continue
        source = record.get("row")
        row = source if isinstance(source, Mapping) else record
        row_id = _row_id(record, position)
        if row_id is None:
            skipped["no usable id"] += 1
            continue
        if row_id in seen:
            skipped["a repeated id (the first record was scored)"] += 1
            continue
        reference = (
            references.get(row_id) if references is not None else _reference(row, f"{path} {line}")
        )
        if reference is None:
            skipped["no reference answers"] += 1
            continue
        seen.add(row_id)
        ran = record.get("ok") is not False
        output = record.get("output")
        output = output if isinstance(output, str) and ran else ""
        calls, tokens, seconds = _usage(record)
        generator = record.get("generator")
        if isinstance(generator, str) and generator:
            generators.add(generator)
        rows.append(
            ScoredRow(
                id=row_id,
                category=reference.category,
                question=reference.question,
                answers=reference.answers,
                output=output,
                correct=bool(output)
                and is_correct(output, reference.answers, mode, reference.question),
                ran=ran,
                calls=calls,
                tokens=tokens,
                seconds=seconds,
            )
        )
    if not rows:
        hint = (
            "do the ids match the rows of --reference?"
            if references is not None
            else "pass the input rows with --reference ROWS if the output does not carry them"
        )
        raise nothing_usable(path, "no row can be scored", skipped, hint)
    name = system_name(name, generators, path)
    missing = len(set(references) - seen) if references is not None else 0
    return ScoredSystem(
        name=name,
        path=str(path),
        mode=mode,
        rows=tuple(rows),
        skipped=dict(skipped),
        missing=missing,
    )


def compare(a: ScoredSystem, b: ScoredSystem) -> Paired:
    """Pair two systems' rows by id; raises InputFileError if they share none."""
    b_rows = {r.id: r for r in b.rows}
    shared = [(r, b_rows[r.id]) for r in a.rows if r.id in b_rows]
    if not shared:
        raise InputFileError(
            f"{a.path} and {b.path}: no row id in common; are they answers to the same rows?"
        )
    return Paired(
        a=a.name,
        b=b.name,
        n=len(shared),
        both=sum(x.correct and y.correct for x, y in shared),
        neither=sum(not x.correct and not y.correct for x, y in shared),
        a_only=tuple(x.id for x, y in shared if x.correct and not y.correct),
        b_only=tuple(x.id for x, y in shared if y.correct and not x.correct),
        unmatched=len(a.rows) + len(b.rows) - 2 * len(shared),
    )


def flipped(systems: Sequence[ScoredSystem], paired: Paired) -> Iterable[tuple[str, ScoredRow]]:
    """(which system got it right, that row) for every flipped row, A's flips first."""
    a, b = systems
    rows_a = {r.id: r for r in a.rows}
    rows_b = {r.id: r for r in b.rows}
    for row_id in paired.a_only:
        yield a.name, rows_a[row_id]
    for row_id in paired.b_only:
        yield b.name, rows_b[row_id]
