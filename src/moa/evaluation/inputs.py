"""Reading what the evaluations judge: two systems' outputs, MT-Bench questions and answers.

Accepted for pairwise, in a JSON list or as JSON Lines:
- `moa batch` output: rows with `id`, `ok`, the final `output` (and `outputs`, one per turn),
  and the input row under `row`, its prompt as `instruction`, `turns` or `messages`; rows
  with `ok: false` are set aside and counted. Rows with the prompt (`instruction`, `prompt`,
  `turns` or `messages`) beside the output are read the same way;
- AlpacaEval model outputs: objects with `instruction`, `output` and `generator`.

A file that cannot be read, is not JSON, or has no usable row is an `InputFileError` (the CLI
exits 2) naming the file and what to fix. Single unusable rows are
counted by reason, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from moa._files import (
    alpaca_prompt,
    read_objects,
    read_usable,
    record_id,
    system_name,
)
from moa.engine import normalize_messages
from moa.errors import InputFileError, InvalidRequest
from moa.evaluation.mt_bench import ModelAnswer, Question
from moa.evaluation.pairwise import PairItem
from moa.providers.base import ChatMessage

__all__ = [
    "InputFileError",
    "Matching",
    "OutputRow",
    "OutputSet",
    "load_answers",
    "load_outputs",
    "load_questions",
    "load_reference_answers",
    "match_outputs",
]

_PAIRWISE_FORMATS = (
    "expected `moa batch` output (rows with id, ok, output and the input row) "
    "or AlpacaEval model outputs (a JSON list of objects with instruction and output)"
)


# --- pairwise -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputRow:
    id: str | None
    history: tuple[ChatMessage, ...]
    turns: tuple[str, ...]
    answers: tuple[str, ...]
    generator: str | None = None

    @property
    def prompt_key(self) -> str:
        """The prompt, as items are matched by when there are no ids."""
        if not self.history and len(self.turns) == 1:
            return self.turns[0].strip()
        return json.dumps(
            [[m["role"], m["content"].strip()] for m in self.history]
            + [["user", t.strip()] for t in self.turns],
            ensure_ascii=False,
        )


@dataclass(frozen=True, slots=True)
class OutputSet:
    path: Path
    name: str
    rows: tuple[OutputRow, ...]
    #: Rows set aside, by reason.
    skipped: dict[str, int] = field(default_factory=dict)


def _strings(value: Any) -> tuple[str, ...] | None:
    """A non-empty list of strings, as a tuple; None for anything else."""
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        return None
    return tuple(value)


def _messages(raw: Any) -> tuple[tuple[ChatMessage, ...], tuple[str, ...]] | None:
    """History and the last user turn of an OpenAI message list."""
    if not isinstance(raw, list) or not raw:
        return None
    # A row may carry its answer as the last message; the judge sees that as the response.
    if isinstance(raw[-1], Mapping) and raw[-1].get("role") == "assistant":
        raw = raw[:-1]
    try:
        messages = normalize_messages(raw)
    except InvalidRequest:
        return None
    return tuple(messages[:-1]), (messages[-1]["content"],)


def _prompt(source: Mapping[str, Any]) -> tuple[tuple[ChatMessage, ...], tuple[str, ...]] | None:
    """(history, user turns) of a row, read as `moa batch` reads its input."""
    instruction = alpaca_prompt(source, "instruction" if "instruction" in source else "prompt")
    if instruction is not None:
        return (), (instruction,)
    turns = _strings(source.get("turns"))
    if turns is not None:
        return (), turns
    return _messages(source.get("messages"))


def _row(record: Any) -> OutputRow | str:
    """A usable row, or the reason the record is not one."""
    if not isinstance(record, Mapping):
        return "not a JSON object"
    if record.get("ok") is False:
        return "failed in the batch (ok: false)"
    output = record.get("output")
    if not isinstance(output, str) or not output.strip():
        return "no output"
    # `moa batch` keeps the input row under "row"; other files have the prompt beside the output.
    source = record.get("row")
    prompt = _prompt(source if isinstance(source, Mapping) else record)
    if prompt is None:
        return "no prompt (instruction, prompt, turns or messages)"
    history, turns = prompt
    answers: tuple[str, ...] = (output,)
    if len(turns) > 1:
        outputs = _strings(record.get("outputs"))
        if outputs is None or len(outputs) != len(turns):
            return "several turns without one answer per turn (outputs)"
        answers = outputs
    raw_id = record.get("id")
    row_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    generator = record.get("generator")
    return OutputRow(
        id=row_id,
        history=history,
        turns=turns,
        answers=answers,
        generator=generator if isinstance(generator, str) and generator else None,
    )


def load_outputs(path: Path, name: str | None = None) -> OutputSet:
    """One system's outputs. Its name: `name`, else the generator every row shares, else the
    file's stem."""
    rows, skipped = read_usable(path, _PAIRWISE_FORMATS, "rows", _row)
    name = system_name(name, (row.generator for row in rows), path)
    return OutputSet(path=path, name=name, rows=tuple(rows), skipped=skipped)


@dataclass(frozen=True, slots=True)
class Matching:
    items: tuple[PairItem, ...]
    by: Literal["id", "instruction"]
    unmatched_a: int
    unmatched_b: int
    #: Items matched by id whose prompts differ between the files.
    prompt_mismatches: int = 0
    #: Matched rows that cannot be compared: the two answered different numbers of turns.
    turn_mismatches: int = 0


def _index(rows: tuple[OutputRow, ...], by_id: bool) -> dict[str, OutputRow]:
    """The rows by key; of rows with one key, the first is used."""
    index: dict[str, OutputRow] = {}
    for row in rows:
        index.setdefault(row.id if by_id and row.id is not None else row.prompt_key, row)
    return index


def match_outputs(a: OutputSet, b: OutputSet) -> Matching:
    """Pair A's rows with B's: by id when every row of both files has one, else by prompt.
    Items follow A's order."""
    by_id = all(row.id is not None for row in (*a.rows, *b.rows))
    index_a, index_b = _index(a.rows, by_id), _index(b.rows, by_id)
    items: list[PairItem] = []
    mismatches = turn_mismatches = 0
    for key, row_a in index_a.items():
        row_b = index_b.get(key)
        if row_b is None:
            continue
        if len(row_a.turns) != len(row_b.turns):
            turn_mismatches += 1
            continue
        if by_id and row_a.prompt_key != row_b.prompt_key:
            mismatches += 1
        items.append(PairItem(key, row_a.history, row_a.turns, row_a.answers, row_b.answers))
    paired = len(items) + turn_mismatches
    return Matching(
        items=tuple(items),
        by="id" if by_id else "instruction",
        unmatched_a=len(index_a) - paired,
        unmatched_b=len(index_b) - paired,
        prompt_mismatches=mismatches,
        turn_mismatches=turn_mismatches,
    )


# --- MT-Bench -------------------------------------------------------------------------------

_QUESTION_FORMAT = (
    "expected MT-Bench questions: one JSON object per line with question_id, category and "
    "turns (a list of strings), and optionally reference"
)
_ANSWER_FORMAT = (
    "expected MT-Bench model answers (one JSON object per line with question_id, model_id "
    "and choices: [{index, turns: [...]}]) or `moa batch` output"
)


def load_questions(path: Path) -> dict[str, Question]:
    """Questions by id, in file order. A malformed question is an error: without it the
    benchmark would silently shrink."""
    questions: dict[str, Question] = {}
    for where, record in read_objects(path, _QUESTION_FORMAT):
        qid = record_id(record.get("question_id"))
        turns = _strings(record.get("turns"))
        if qid is None or turns is None:
            raise InputFileError(
                f"{where}: needs question_id and a non-empty list of turns; {_QUESTION_FORMAT}"
            )
        if qid in questions:
            raise InputFileError(f"{where}: question_id {qid} appears twice")
        category = record.get("category")
        reference = record.get("reference")
        refs: tuple[str | None, ...] = ()
        if isinstance(reference, list):
            refs = tuple(r if isinstance(r, str) else None for r in reference)
        questions[qid] = Question(
            id=qid,
            category=category if isinstance(category, str) and category else "uncategorized",
            turns=turns,
            reference=refs,
        )
    if not questions:
        raise InputFileError(f"{path}: no questions; {_QUESTION_FORMAT}")
    return questions


def _answer(record: Any) -> ModelAnswer | str:
    if not isinstance(record, Mapping):
        return "not a JSON object"
    if "question_id" not in record and "outputs" in record:
        return _batch_answer(record)
    qid = record_id(record.get("question_id"))
    if qid is None:
        return "no question_id"
    choices = record.get("choices")
    turns: tuple[str, ...] | None = None
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        turns = _strings(choices[0].get("turns"))
    if turns is None:
        return "no choices[0].turns"
    model = record.get("model_id")
    return ModelAnswer(
        question_id=qid, model=model if isinstance(model, str) and model else "model", turns=turns
    )


def _batch_answer(record: Mapping[str, Any]) -> ModelAnswer | str:
    """A `moa batch` output line: the answer per turn under `outputs`, the question's id as
    the row's id (its `question_id` when the input row had one)."""
    if record.get("ok") is False:
        return "failed in the batch (ok: false)"
    source = record.get("row")
    qid = record_id(source.get("question_id")) if isinstance(source, Mapping) else None
    qid = qid or record_id(record.get("id"))
    if qid is None:
        return "no question_id (nor id)"
    turns = _strings(record.get("outputs"))
    if turns is None:
        return "no outputs"
    model = record.get("generator")
    return ModelAnswer(
        question_id=qid, model=model if isinstance(model, str) and model else "model", turns=turns
    )


def load_answers(path: Path) -> tuple[list[ModelAnswer], dict[str, int]]:
    """Answers in file order, and the records set aside by reason."""
    return read_usable(path, _ANSWER_FORMAT, "answers", _answer)


def load_reference_answers(path: Path, questions: dict[str, Question]) -> dict[str, Question]:
    """`questions` with reference answers taken from a model-answer file (such as MT-Bench's
    reference answers), overriding any given in the questions file."""
    answers, _ = load_answers(path)
    merged = dict(questions)
    for answer in answers:
        question = merged.get(answer.question_id)
        if question is not None:
            merged[answer.question_id] = replace(question, reference=answer.turns)
    return merged
