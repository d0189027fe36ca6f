"""Continuing a partial answer: the messages that ask for it, and joining the pieces.

Staircase streaming (moa.staircase) writes the final answer in steps, and every step must go
on from the text before it. Three ways, by what the backend can do:

- native: the backend extends the partial assistant message itself. The embedded llama.cpp
  model renders the chat template up to the assistant's turn and appends the partial text;
  vLLM does the same with `continue_final_message`; servers that treat a trailing assistant
  message as the start of the reply ("prefill") too. The continuation joins exactly.
- fallback: any chat model. The partial answer is shown as the assistant's last turn and a
  user message asks to go on from where it stops; a model may then repeat the tail or drop
  the space, which `join_continuation` repairs.

A step is cut by its token limit, often inside a word. So that no word is ever cut at a step
boundary, the text after a step's last whitespace is dropped, never shown, and written again
by the next step (`WordGate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # importing moa.providers at run time would import moa.config: a cycle
    from moa.providers.base import ChatMessage

__all__ = [
    "Continuation",
    "StepSchedule",
    "WordGate",
    "continue_messages",
    "join_continuation",
]

Continuation = Literal["native", "fallback"]

#: The fallback's request. Our own wording: short, and explicit about what not to do.
CONTINUE_INSTRUCTION = (
    "Your reply above is unfinished. Go on writing it from exactly where it stops, as if you "
    "had never been interrupted: do not repeat any of it, do not start over, do not comment."
)
#: An overlap shorter than this is taken as a coincidence, not a repetition.
_MIN_OVERLAP = 8


def continue_messages(
    messages: Sequence[ChatMessage], partial: str, how: Continuation
) -> list[ChatMessage]:
    """`messages` (ending with the user's turn) followed by the partial answer to continue."""
    extended: list[ChatMessage] = [*messages, {"role": "assistant", "content": partial}]
    if how == "fallback":
        extended.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return extended


def join_continuation(answer: str, text: str) -> str:
    """The text a fallback continuation adds after `answer`: a repeated tail removed, a missing
    space between two words put back."""
    if not answer or not text:
        return text
    for size in range(min(len(answer), len(text)), _MIN_OVERLAP - 1, -1):
        if answer.endswith(text[:size]):
            text = text[size:]
            break
    if text and not answer[-1].isspace() and not text[0].isspace() and text[0].isalnum():
        text = " " + text
    return text


class WordGate:
    """Passes a step's text on as it streams, holding back the last unfinished word.

    `commit()` ends a step that will be continued: the held-back piece is dropped and the text
    passed on is returned. `flush()` ends the last step: everything goes out.
    """

    def __init__(self, emit: Callable[[str], None], *, live: bool = True) -> None:
        self._emit = emit
        self._live = live
        self._text = ""
        self._sent = 0

    def feed(self, text: str) -> None:
        self._text += text
        if self._live:
            self._send(self._boundary())

    def _boundary(self) -> int:
        """Where the last whitespace begins: text before it is made of whole words."""
        end = len(self._text)
        while end > self._sent and not self._text[end - 1].isspace():
            end -= 1
        while end > self._sent and self._text[end - 1].isspace():
            end -= 1
        return end

    def _send(self, end: int) -> None:
        if end > self._sent:
            self._emit(self._text[self._sent : end])
            self._sent = end

    def commit(self) -> str:
        end = self._boundary()
        if end == 0 and self._sent == 0:
            end = len(self._text)  # no whitespace at all (code, CJK): keep it rather than loop
        self._send(end)
        return self._text[:end]

    def flush(self) -> str:
        self._send(len(self._text))
        return self._text


@dataclass(frozen=True, slots=True)
class StepSchedule:
    """Token limits of the staircase's steps: `first`, then each `growth` times the last, at
    most `largest`. The last step (once every proposer is done) takes what max_tokens leaves."""

    first: int = 32
    growth: float = 2.0
    largest: int = 512

    def sizes(self) -> Iterator[int]:
        size = float(self.first)
        while True:
            yield max(1, min(int(size), self.largest))
            size *= self.growth
