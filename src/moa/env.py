"""The one place that reads the environment, and the guard that keeps API keys out of logs.

Keys come only from environment variables (or a .env file the user names). Each key read is
registered with `redact`, and `RedactingFilter`, added to a logging handler, replaces any
registered key in every log record, whatever logger emitted it (ours, openai's, httpx's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from moa._secrets import _SECRETS, check_key, redact, register_secret
from moa.errors import ConfigError

__all__ = ["Environment", "RedactingFilter", "redact", "register_secret"]


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


class Environment:
    """Environment variables, optionally overlaid with a .env file (which wins)."""

    def __init__(self, values: Mapping[str, str] | None = None, env_file: str | Path | None = None):
        self._values: dict[str, str] = dict(os.environ if values is None else values)
        if env_file is not None:
            self._values.update(read_env_file(env_file))

    def get(self, name: str) -> str | None:
        value = self._values.get(name)
        return value if value else None

    def api_key(self, variable: str, provider: str) -> str:
        """The key in `variable`, or a ConfigError that says how to provide it."""
        value = self.get(variable)
        if value is None:
            raise ConfigError(
                f"provider {provider!r} needs an API key: set the environment variable "
                f"{variable} (or put it in a .env file named with --env-file)"
            )
        value = value.strip()
        problem = check_key(value)
        if problem is not None:
            # Never the value: it may be the key with a paste accident in it.
            raise ConfigError(
                f"the environment variable {variable} (the API key of provider {provider!r}) "
                f"cannot be a key: {problem}; set it to the key alone, on one line"
            )
        register_secret(value)
        return value


def read_env_file(path: str | Path) -> dict[str, str]:
    from dotenv import dotenv_values

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such .env file")
    return {k: v for k, v in dotenv_values(path).items() if v is not None}
