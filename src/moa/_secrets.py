"""The registry of secret values (API keys) that must never be printed, and their redaction.

Kept apart from `moa.env` so that the error classes can redact their own messages without an
import cycle: an upstream error body that echoes the key back is scrubbed where it is caught.

Three ways a key used to slip past a plain search-and-replace, each handled here:

* text clipped for display can end in the key's first characters, which no longer match the
  whole key: `clip` redacts before it cuts, and `redact` also drops a key's head left at the
  very end of a text (or just before an ellipsis) by anyone who clipped first;
* a key percent-encoded in a URL (`?api_key=%73%6B…`): text holding `%` is decoded, and if the
  decoded form carries a key, the decoded form is what gets redacted and shown;
* a key with a newline or a non-ASCII character inside, which reprs escape: such keys are
  refused where they are read (`check_key`), so they never reach a header or a message.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from urllib.parse import unquote

__all__ = ["check_key", "clip", "looks_like_key", "redact", "register_secret"]

_SECRETS: set[str] = set()
#: Shorter values are not treated as secrets: replacing them would mangle ordinary text.
_MIN_SECRET_LENGTH = 6
#: A key's head this long or longer at the end of a text is redacted as well.
_MIN_FRAGMENT = 4
_MASK = "***"
_ELLIPSES = ("…", "...")


def register_secret(value: str) -> None:
    if len(value) >= _MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every registered key, whole or as a clipped head at its end, replaced."""
    if not _SECRETS:
        return text
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    if "%" in text:
        decoded = _percent_decoded(text)
        if decoded != text and any(secret in decoded for secret in _SECRETS):
            return redact(decoded)
    return _redact_tail(text)


def _percent_decoded(text: str) -> str:
    # Twice at most: a key encoded twice (%2573…) is still the key to whoever decodes it twice.
    for _ in range(2):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def _redact_tail(text: str) -> str:
    body = text
    ellipsis = ""
    for mark in _ELLIPSES:
        if body.endswith(mark):
            body, ellipsis = body[: -len(mark)], mark
            break
    for secret in _SECRETS:
        # Where a head of `secret` could start: within the last len(secret) - 1 characters.
        start = max(0, len(body) - len(secret) + 1)
        head = secret[:_MIN_FRAGMENT]
        while (found := body.find(head, start)) != -1:
            if secret.startswith(body[found:]):
                return body[:found] + _MASK + ellipsis
            start = found + 1
    return text


def clip(text: str, limit: int) -> str:
    """At most `limit` characters (plus an ellipsis), redacted before it is cut, so the cut
    can never leave a key's head behind."""
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + "…"


# --- keys as they are read --------------------------------------------------------------

#: Prefixes of keys that providers hand out (OpenAI, Anthropic, Groq, Hugging Face, xAI,
#: Google, Perplexity, GitHub, Stripe-style, Replicate, Fireworks, Together's newer ones…).
_KEY_PREFIXES = (
    "sk-",
    "sk_",
    "gsk_",
    "hf_",
    "xai-",
    "AIza",
    "pplx-",
    "ghp_",
    "github_pat_",
    "pk_",
    "rk_",
    "r8_",
    "fw_",
    "tgp_",
    "nvapi-",
    "csk-",
    "key-",
)
_LONG_RUN = re.compile(r"[A-Za-z0-9]{20,}")


def looks_like_key(value: str) -> bool:
    """Whether `value`, given where a variable NAME belongs, is more likely a key itself.

    Variable names are words joined by underscores (TOGETHER_API_KEY); keys are long runs of
    random-looking characters, often behind a known prefix. A false alarm only asks the user
    to rename a variable; a miss would print their key, so the rule leans towards refusing.
    """
    if value.startswith(_KEY_PREFIXES) or len(value) > 64:
        return True
    for run in _LONG_RUN.findall(value):
        has_digit = any(c.isdigit() for c in run)
        if has_digit or _entropy_bits(run) >= 3.6:
            return True
    return False


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def check_key(value: str) -> str | None:
    """Why `value` cannot be an API key (a phrase that never repeats it), or None if it can.

    HTTP headers carry printable ASCII only; a newline or a space inside is a paste accident
    that would make the request fail with the key in the exception text.
    """
    for character in value:
        if character in " \t":
            return "it contains a space or a tab inside"
        if character in "\r\n":
            return "it contains a line break inside"
        if not ("!" <= character <= "~"):
            return "it contains a character that is not printable ASCII"
    return None
