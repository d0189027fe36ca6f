"""The registry of secret values (API keys) that must never be printed, and their redaction.

Kept apart from `moa.env` so that the error classes can redact their own messages without an
import cycle: an upstream error body that echoes the key back is scrubbed where it is caught.
"""

from __future__ import annotations

_SECRETS: set[str] = set()
#: Shorter values are not treated as secrets: replacing them would mangle ordinary text.
_MIN_SECRET_LENGTH = 6


def register_secret(value: str) -> None:
    if len(value) >= _MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text
