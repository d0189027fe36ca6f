"""Reading a batch input: JSONL or a JSON list, in AlpacaEval, MT-Bench or OpenAI shape.

    {"instruction": "…"}                               AlpacaEval (an `input` field is appended)
    {"question_id": 81, "turns": ["…", "…"]}           MT-Bench question.jsonl: turn by turn
    {"id": "a", "messages": [{"role": …}, …]}          OpenAI messages, ending with the user's
    {"question_id": 1, "text": "…", "metrics": […]}    FLASK evaluation rows (`idx` as id too)

A row's id is its `id`, else its `question_id`, else its `idx`, else its position (0-based).
The whole input is checked before anything runs, and every problem is reported as one line
naming the file, the row and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa._files import alpaca_prompt, read_records, record_id
from moa._text import replace_unencodable
from moa.engine import normalize_messages
from moa.errors import InputFileError, InvalidRequest
from moa.providers.base import ChatMessage

__all__ = ["Row", "RowId", "id_key", "load_rows"]

RowId = int | str
_CONTENT_KEYS = ("instruction", "turns", "messages")
_FORMATS = "rows with 'instruction', 'turns' or 'messages'"


def id_key(row_id: RowId) -> str:
    """A row id as a stable string: 7 and "7" stay distinct, as they are in the input."""
    return json.dumps(row_id, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Row:
    """One input row, checked and ready to run."""

    id: RowId
    #: Messages before the first turn (an OpenAI row's system prompt and earlier exchanges).
    history: tuple[ChatMessage, ...]
    #: The user's messages, run one after another, each with the earlier answers in the history.
    turns: tuple[str, ...]
    #: The row exactly as given, kept in the output so a result stands on its own.
    data: dict[str, Any] = field(repr=False)
    #: Where the row is, for messages: "line 4" (JSONL) or "row 4" (a JSON list).
    where: str = ""
    #: What was changed in the row before it ran (text that could not be encoded), for its record.
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return id_key(self.id)

    @property
    def instruction(self) -> str:
        """The prompt as AlpacaEval knows it: the instruction, else the last user message."""
        instruction = self.data.get("instruction")
        return instruction if isinstance(instruction, str) else self.turns[-1]


def load_rows(path: Path) -> list[Row]:
    """Every row of `path`, or an InputFileError naming the first problem."""
    items = read_records(path, _FORMATS)
    if not items:
        raise InputFileError(f"{path}: no rows (expected JSONL, or a JSON list of objects)")
    rows: list[Row] = []
    seen: dict[str, str] = {}
    for index, (where, item) in enumerate(items):
        row = _row(path, where, index, item)
        earlier = seen.get(row.key)
        if earlier is not None:
            raise InputFileError(
                f"{path} {where}: id {row.id!r} is already used at {earlier}: "
                "ids must be unique (fix them, or drop the id fields to number rows by position)"
            )
        seen[row.key] = where
        rows.append(row)
    return rows


def _row(path: Path, where: str, index: int, item: Any) -> Row:
    def fail(problem: str) -> InputFileError:
        return InputFileError(f"{path} {where}: {problem}")

    notes: tuple[str, ...] = ()
    item, replaced = replace_unencodable(item)
    if replaced:
        # One row's cut emoji must not stop the batch: it runs with U+FFFD, and says so.
        notes = (
            f"{replaced} character(s) that cannot be encoded as UTF-8 (lone UTF-16 surrogates, "
            "e.g. a cut emoji) were replaced by U+FFFD",
        )
    if not isinstance(item, dict):
        raise fail(
            f"expected a JSON object with 'instruction', 'turns' or 'messages', "
            f"got {type(item).__name__}"
        )
    present = [key for key in _CONTENT_KEYS if key in item]
    instruction_key = "instruction"
    if not present and "text" in item:  # FLASK names the instruction `text`
        instruction_key, present = "text", ["instruction"]
    if not present:
        raise fail("no 'instruction', 'turns' or 'messages': every row needs one of them")
    if len(present) > 1:
        raise fail(f"has both {present[0]!r} and {present[1]!r}: keep one of them")
    kind = present[0]

    row_id: Any = item.get("id", item.get("question_id", item.get("idx", index)))
    if record_id(row_id) is None:
        field_name = next((k for k in ("id", "question_id", "idx") if k in item), "id")
        raise fail(f"{field_name!r} must be a non-empty string or an integer, got {row_id!r}")

    history: tuple[ChatMessage, ...] = ()
    if kind == "instruction":
        instruction = alpaca_prompt(item, instruction_key)
        if instruction is None:
            raise fail(f"{instruction_key!r} must be a non-empty string")
        turns: tuple[str, ...] = (instruction,)
    elif kind == "turns":
        raw = item["turns"]
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(t, str) and t.strip() for t in raw)
        ):
            raise fail("'turns' must be a non-empty list of non-empty strings (the user's turns)")
        turns = tuple(raw)
    else:
        raw = item["messages"]
        if not isinstance(raw, list):
            raise fail("'messages' must be a list of {role, content} objects")
        try:
            messages = normalize_messages(raw)
        except InvalidRequest as error:
            raise fail(f"messages: {error}") from None
        history, turns = tuple(messages[:-1]), (messages[-1]["content"],)
    return Row(id=row_id, history=history, turns=turns, data=item, where=where, notes=notes)
