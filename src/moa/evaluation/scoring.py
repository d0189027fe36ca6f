"""Is a short answer right? Matching an output against accepted reference answers.

Three rules, and `auto` choosing between them per accepted answer:

- `exact`: the whole output, normalised, equals an accepted answer, normalised.
- `numeric`: the output's answer number equals an accepted number. The answer number is the
  last number in the output that the question does not itself state, as worked answers end
  on their result ("3 minutes is 3 × 60 = 180 seconds" answers 180, and "120 minutes in 2
  hours" answers 120); when every number in the output is one of the question's, the last
  one. Digits, thousands separators ("1,000") and number words up to the tens ("eight",
  "thirty") are read.
- `contains`: an accepted answer appears in the output as whole words ("Paris" in "It is
  Paris.", not "Parisian"). An output listing several guesses gets credit if one is right:
  look at tokens per answer beside accuracy to see that happen.
- `auto` (the default): `numeric` for an accepted answer that is a number, `contains` for one
  that is not.

Normalising lowercases, folds accents and Unicode forms, drops punctuation (but keeps a
decimal point between digits) and the articles a, an, the, and collapses whitespace.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

__all__ = ["MATCH_MODES", "MatchMode", "answer_number", "is_correct", "normalize", "numbers_in"]

MatchMode = Literal["auto", "exact", "numeric", "contains"]
MATCH_MODES: tuple[MatchMode, ...] = ("auto", "exact", "numeric", "contains")

_ARTICLES = frozenset({"a", "an", "the"})
_UNITS = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen", "twenty"),
]
_TENS = {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80}
_TENS |= {"ninety": 90}
_WORD_NUMBERS: dict[str, float] = {word: float(n) for n, word in enumerate(_UNITS)}
_WORD_NUMBERS |= {word: float(n) for word, n in _TENS.items()}
_WORD_NUMBERS |= {"hundred": 100.0, "thousand": 1000.0}
# A number: digits with optional thousands separators and decimals, or a number word (tens
# may take a unit: "thirty-one"). Separators must come in threes so "1,2" stays two numbers.
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])"
    r"|\b(?:" + "|".join(_TENS) + r")(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?\b"
    r"|\b(?:" + "|".join(sorted(_WORD_NUMBERS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def _fold(text: str) -> str:
    """Lowercase, compatibility-normalised, accents removed ("Brasília" → "brasilia")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize(text: str) -> str:
    """Text reduced to lowercase words: no punctuation, articles or extra spaces."""
    folded = _fold(text)
    folded = re.sub(r"(?<=\d),(?=\d{3}\b)", "", folded)  # 1,000 → 1000
    folded = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", folded)  # full stops go, 1.5 stays
    folded = re.sub(r"[^\w.]+", " ", folded)
    return " ".join(w for w in folded.split() if w not in _ARTICLES)


def _value(token: str) -> float:
    token = token.casefold()
    if token in _WORD_NUMBERS:
        return _WORD_NUMBERS[token]
    parts = re.split(r"[- ]", token)
    if len(parts) == 2 and parts[0] in _WORD_NUMBERS:
        return _WORD_NUMBERS[parts[0]] + _WORD_NUMBERS[parts[1]]
    return float(token.replace(",", ""))


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order."""
    return [_value(m.group(0)) for m in _NUMBER.finditer(_fold(text))]


def parse_number(text: str) -> float | None:
    """`text` as a number if it is one and nothing else ("1,000", "12", "eight")."""
    stripped = text.strip().rstrip(".")
    match = _NUMBER.fullmatch(_fold(stripped))
    return _value(match.group(0)) if match else None


def answer_number(output: str, question: str = "") -> float | None:
    """The number an output gives as its answer (see the module docstring), or None."""
    found = numbers_in(output)
    if not found:
        return None
    given = set(numbers_in(question))
    fresh = [n for n in found if n not in given]
    return fresh[-1] if fresh else found[-1]


def _contains(output: str, accepted: str) -> bool:
    needle = normalize(accepted)
    if not needle:
        return False
    return f" {needle} " in f" {normalize(output)} "


def is_correct(
    output: str, accepted: Sequence[str], mode: MatchMode = "auto", question: str = ""
) -> bool:
    """Whether `output` matches any accepted answer under `mode`."""
    number: float | None = None
    number_read = False
    for answer in accepted:
        if mode == "exact":
            if normalize(output) == normalize(answer) and normalize(answer):
                return True
            continue
        expected = parse_number(answer)
        if mode == "numeric" or (mode == "auto" and expected is not None):
            if expected is None:
                continue
            if not number_read:
                number, number_read = answer_number(output, question), True
            if number is not None and abs(number - expected) <= 1e-9 * max(1.0, abs(expected)):
                return True
            continue
        if _contains(output, answer):
            return True
    return False
