"""The files the faces read and write, read and written one way: every input (batch rows,
answers to judge, questions, references) is a JSON list or JSON Lines whose problems are one
`InputFileError` line naming the file and the line; every result is written atomically."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from moa.errors import InputFileError

__all__ = [
    "alpaca_prompt",
    "nothing_usable",
    "read_objects",
    "read_records",
    "read_usable",
    "record_id",
    "system_name",
    "write_atomically",
]

T = TypeVar("T")


def read_records(path: Path, expected: str) -> list[tuple[str, Any]]:
    """(where, value) for each record of `path`: a JSON list if the text starts with '[' (where
    is "row N"), else JSON Lines (where is "line N", blank lines skipped). `expected` says
    what the file should hold, for the error line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory; give the file itself") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: cannot read it ({error})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputFileError(
                f"{path}: not valid JSON at line {error.lineno}, column {error.colno} "
                f"({error.msg}); {expected}"
            ) from None
        return [(f"row {number}", item) for number, item in enumerate(data, start=1)]
    records: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise InputFileError(
                f"{path} line {number}: not valid JSON ({error.msg}); {expected}, as JSON Lines "
                "(one JSON object per line) or one JSON list"
            ) from None
    return records


def read_objects(path: Path, expected: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The records of a file whose every record must be a JSON object, each with where it is
    ("FILE line N"); anything else is an InputFileError."""
    objects: list[tuple[str, Mapping[str, Any]]] = []
    for line, record in read_records(path, expected):
        if not isinstance(record, Mapping):
            raise InputFileError(f"{path} {line}: not a JSON object; {expected}")
        objects.append((f"{path} {line}", record))
    return objects


def nothing_usable(path: Path, what: str, skipped: Mapping[str, int], hint: str) -> InputFileError:
    """The error for a file with no usable record: why each was set aside, counted."""
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "the file is empty"
    return InputFileError(f"{path}: {what} ({why}); {hint}")


def read_usable(
    path: Path, expected: str, what: str, parse: Callable[[Any], T | str]
) -> tuple[list[T], dict[str, int]]:
    """The records of `path` that `parse` makes something of, and the others counted by the
    reason it gives instead; InputFileError("no usable `what`") when there is none."""
    usable: list[T] = []
    skipped: Counter[str] = Counter()
    for _, record in read_records(path, expected):
        item = parse(record)
        if isinstance(item, str):
            skipped[item] += 1
        else:
            usable.append(item)
    if not usable:
        raise nothing_usable(path, f"no usable {what}", skipped, expected)
    return usable, dict(skipped)


def record_id(value: Any) -> str | None:
    """An id as input files give it (a non-empty string or an integer, never `true`), as a
    string; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        return None
    return str(value)


def system_name(name: str | None, generators: Iterable[str | None], path: Path) -> str:
    """What to call the system whose outputs `path` holds: `name`, else the generator all its
    records share, else the file's stem."""
    found = set(generators)
    return name or (found.pop() if len(found) == 1 else None) or path.stem


def alpaca_prompt(record: Mapping[str, Any], key: str = "instruction") -> str | None:
    """The record's instruction (under `key`) with Alpaca's optional `input`, the context for
    the task, after it; None if there is no non-empty instruction."""
    instruction = record.get(key)
    if not isinstance(instruction, str) or not instruction.strip():
        return None
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction


def write_atomically(path: Path, data: str | bytes, *, temporary: Path | None = None) -> None:
    """Write `data` to `path` through a temporary file beside it (default `.NAME.writing`):
    written, fsynced, renamed over `path`, and the directory fsynced, so a failure or a
    `kill -9` at any point leaves the old file or the new one. The temporary file never
    outlives a failure."""
    temporary = temporary or path.with_name(f".{path.name}.writing")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(temporary, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    with contextlib.suppress(OSError):  # not possible on every platform; the rename still holds
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
