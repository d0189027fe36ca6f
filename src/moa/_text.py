"""Text that cannot be encoded: the one place that finds it, names it, and replaces it.

A Python string can hold a lone UTF-16 surrogate (U+D800–U+DFFF): JSON's `"\\ud83d"` escape
decodes to one (a truncated emoji, common in scraped data), and so do undecodable bytes in
`sys.argv` (Python keeps them as U+DC80–U+DCFF). No UTF-8 encoder accepts it, so such text
fails wherever it is hashed, sent upstream or written out. Each face decides what to do with
it, through this module only:

* `moa batch` replaces it with U+FFFD and notes that in the row's record, so one bad row never
  stops the others;
* `moa serve` answers 400 naming the field; `moa ask` and the library raise `InvalidRequest`
  naming where it is, since their caller can fix the text.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REPLACEMENT", "describe_unencodable", "find_unencodable", "replace_unencodable"]

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def describe_unencodable(text: str) -> str | None:
    """What is wrong with `text` ("a lone UTF-16 surrogate U+D83D at character 3"), or None."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    code = ord(found.group())
    kind = (
        "a byte that is not UTF-8 (0x%02X)" % (code - 0xDC00)
        if 0xDC80 <= code <= 0xDCFF
        else f"a lone UTF-16 surrogate U+{code:04X}"
    )
    return f"{kind} at character {found.start() + 1}"


def find_unencodable(value: Any, where: str = "") -> tuple[str, str] | None:
    """(path, problem) of the first string in a JSON value that cannot be encoded, or None.

    Paths read like `messages[0].content`; keys are checked as well as values.
    """
    if isinstance(value, str):
        problem = describe_unencodable(value)
        return None if problem is None else (where or "(the value)", problem)
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and (problem := describe_unencodable(key)) is not None:
                return f"{where or '(the object)'} key", problem
            if (found := find_unencodable(item, path)) is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := find_unencodable(item, f"{where}[{index}]")) is not None:
                return found
    return None


def replace_unencodable(value: Any) -> tuple[Any, int]:
    """`value` (a JSON value) with every unencodable character replaced by U+FFFD, and how
    many were replaced. Values without any come back as they are (the same object)."""
    if isinstance(value, str):
        cleaned, count = _SURROGATE.subn(REPLACEMENT, value)
        return (cleaned, count) if count else (value, 0)
    if isinstance(value, dict):
        total = 0
        result: dict[Any, Any] = {}
        for key, item in value.items():
            new_key, in_key = replace_unencodable(key)
            new_item, in_item = replace_unencodable(item)
            total += in_key + in_item
            result[new_key] = new_item
        return (result, total) if total else (value, 0)
    if isinstance(value, list | tuple):
        total = 0
        items = []
        for item in value:
            new_item, count = replace_unencodable(item)
            total += count
            items.append(new_item)
        return (type(value)(items), total) if total else (value, 0)
    return value, 0
