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

__all__ = ["ApiError", "error_body", "json_bytes", "json_response"]

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UPSTREAM_ERROR = "upstream_error"


class ApiError(Exception):
    """A request we answer with an error status. Raised anywhere below an endpoint."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        #: Top-level keys sent beside "error" (the partial `moa` result of a failed run).
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {**error_body(self.message, self.type, self.param, self.code), **self.extra}

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
