"""Errors in OpenAI's format, so every OpenAI client raises its usual exception for them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model", "code": "..."}}

Every body we send goes through `moa.env.redact`: an upstream error message that quotes a key
must not hand that key to our clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from moa.env import redact
from moa.errors import ApiError

__all__ = [
    "ApiError",
    "error_response",
    "internal_error",
    "invalid",
    "json_bytes",
    "json_response",
    "unsupported",
]

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UPSTREAM_ERROR = "upstream_error"


def invalid(message: str, param: str | None = None, *, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> ApiError:
    """A parameter (or a kind of content) MoA pipelines do not take."""
    return ApiError(400, message, param=param, code="unsupported_parameter")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def internal_error() -> ApiError:
    """What a client is told of a bug: the details are for the server log only."""
    return ApiError(500, "internal error: see the server log", type=SERVER_ERROR, code="internal")


def json_bytes(payload: Any) -> bytes:
    """Compact JSON with registered secrets redacted. (Streamed answer text skips this: see
    `EventSender.text`.)"""
    return redact(json.dumps(payload, ensure_ascii=False, separators=(",", ":"))).encode()


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        json_bytes(payload), status_code=status, headers=headers, media_type="application/json"
    )
