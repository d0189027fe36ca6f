"""A pydantic validation error as the one problem we report, for config files and API requests
alike: a misspelt key first (it often explains the others: `aggregater` leaves `aggregator`
missing), located without pydantic's names for union members, and worded without its prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["Problem", "first_problem"]

#: What pydantic puts in a location for the union member it tried ("int", "list[AgentConfig]",
#: a model's name): never a key of ours.
_UNION_MEMBERS = frozenset(
    {"str", "int", "float", "bool", "list", "dict", "LayerConfig", "StreamOptions"}
)


@dataclass(frozen=True, slots=True)
class Problem:
    location: tuple[int | str, ...]
    message: str
    #: pydantic's error type ("missing", "extra_forbidden", ...).
    kind: str
    value: Any
    #: Further problems in the same error.
    more: int


def first_problem(error: ValidationError) -> Problem:
    problems = error.errors()
    first = min(problems, key=lambda e: e["type"] != "extra_forbidden")
    location = tuple(
        part
        for part in first["loc"]
        if not (isinstance(part, str) and ("[" in part or part in _UNION_MEMBERS))
    )
    message = str(first["msg"]).removeprefix("Value error, ")
    return Problem(location, message, first["type"], first.get("input"), len(problems) - 1)
