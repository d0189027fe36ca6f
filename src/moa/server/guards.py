"""What a request passes before it may start a run: the key check, draining, the body cap and
a free run slot. Each answers in OpenAI's error format with the status clients expect."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moa._secrets import check_key
from moa.env import register_secret
from moa.errors import ClientGone, ConfigError
from moa.server.connections import DEFAULT_BODY_TIMEOUT_S
from moa.server.errors import RATE_LIMIT, SERVER_ERROR, ApiError, error_response

if TYPE_CHECKING:
    from moa.server.app import ServerState

__all__ = [
    "REDIRECT_FIELDS",
    "ApiKeys",
    "GuardMiddleware",
    "RunSlots",
    "parse_api_keys",
    "read_body",
    "redirect_field",
]

#: Shorter keys are refused: they are guessable, and too short to be redacted from logs.
MIN_KEY_LENGTH = 8
#: A body over the cap is read on (and thrown away) up to this much more, so the client
#: finishes sending and reads our 413 instead of a connection reset. Beyond it we hang up.
_DISCARD_LIMIT = 16 * 1024 * 1024
#: How long a refused client should wait before trying again, in seconds.
RETRY_AFTER_S = 1


#: A request field is refused when its name, lower-cased with everything but letters and digits
#: dropped (`baseURL`, `base-url`, `openai_api_base` → `baseurl`, `baseurl`, `openaiapibase`),
#: contains one of these: then no new spelling of "send this call elsewhere, with other
#: credentials" gets through for want of a list entry. None of OpenAI's request fields does.
REDIRECT_FIELDS = (
    "baseurl",
    "apibase",
    "apiurl",
    "apikey",
    "apiversion",
    "apitype",
    "endpoint",
    "organization",
    "organisation",
    "headers",
    "proxy",
    "proxies",
    "deployment",
    "credential",
    "secretkey",
    "accesskey",
    "authtoken",
    "authorization",
    "bearer",
    "password",
    "url",
    "host",
)
#: Whole names refused as well (too short to look for inside other names).
_REDIRECT_NAMES = frozenset({"key", "token", "auth", "secret"})
#: Fields holding the conversation: their keys are message parts, not request settings.
_CONTENT_FIELDS = frozenset({"messages", "input"})


def redirect_field(data: Mapping[str, Any], where: str = "", depth: int = 0) -> str | None:
    """The first field of a request (dotted, like `extra_body.base_url`) whose name says it
    would re-target or re-key upstream calls, or None. Nested objects are searched too, since
    some clients pass settings through `extra_body`; conversation content is not."""
    for key, value in data.items():
        name = "".join(c for c in str(key).lower() if c.isalnum())
        path = f"{where}.{key}" if where else str(key)
        if name in _REDIRECT_NAMES or any(token in name for token in REDIRECT_FIELDS):
            return path
        if isinstance(value, Mapping) and depth < 8 and not (depth == 0 and key in _CONTENT_FIELDS):
            found = redirect_field(value, path, depth + 1)
            if found is not None:
                return found
    return None


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """MOA_API_KEYS: comma-separated keys; spaces around each are ignored."""
    keys = tuple(k.strip() for k in (value or "").split(",") if k.strip())
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ConfigError(
            f"MOA_API_KEYS: {len(short)} key(s) shorter than {MIN_KEY_LENGTH} characters; use long "
            "random keys, e.g. from: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    if any(" " in k for k in keys):
        raise ConfigError("MOA_API_KEYS: a key contains a space; separate keys with commas")
    for number, key in enumerate(keys, start=1):
        problem = check_key(key)
        if problem is not None:  # said without the key
            raise ConfigError(f"MOA_API_KEYS: key {number} cannot be a key: {problem}")
    return keys


class ApiKeys:
    """The keys clients may present as `Authorization: Bearer <key>`.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key in
    turn: neither a key's length nor which key matched shows in the response time.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        keys = tuple(keys)
        if any(len(k) < MIN_KEY_LENGTH for k in keys):
            raise ValueError(f"API keys must be at least {MIN_KEY_LENGTH} characters long")
        self._digests = tuple(_digest(k) for k in keys)
        for key in keys:
            register_secret(key)  # kept out of every log line from now on

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        offered = _digest(token.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(offered, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class GuardMiddleware:
    """Refuses a request before routing: while draining (503), or on /v1 without a valid key
    (401). /healthz stays open so probes see the draining state. `protect` names more paths
    that need the key (/metrics, unless it is public)."""

    def __init__(self, app: ASGIApp, *, state: ServerState, protect: tuple[str, ...] = ()) -> None:
        self.app = app
        self.state = state
        self.protect = protect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        refusal: ApiError | None = None
        if self.state.draining and path != "/healthz":
            refusal = ApiError(
                503,
                "the server is shutting down and takes no new requests; retry on another instance",
                type=SERVER_ERROR,
                code="server_shutting_down",
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            )
        elif self.state.keys and (path == "/v1" or path.startswith("/v1/") or path in self.protect):
            refusal = self._check_key(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_key(self, scope: Scope) -> ApiError | None:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return _unauthorized(
                "no API key: send the header 'Authorization: Bearer <key>' with one of the "
                "keys in this server's MOA_API_KEYS"
            )
        if not self.state.keys.accepts(values[0].decode("latin-1")):
            return _unauthorized(
                "invalid API key: the bearer token is not one of this server's MOA_API_KEYS"
            )
        return None


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="moa"'}
    )


class RunSlots:
    """At most `limit` runs at once; one more is refused with 429 at once rather than queued,
    so a client (or a load balancer) can retry elsewhere instead of waiting blind."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.limit = limit
        self.in_use = 0

    def take(self) -> Slot:
        if self.in_use >= self.limit:
            raise ApiError(
                429,
                f"this server is already running its limit of {self.limit} requests; "
                f"retry after {RETRY_AFTER_S} s",
                type=RATE_LIMIT,
                code="too_many_concurrent_requests",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_use += 1
        return Slot(self)


class Slot:
    """One taken run slot; releasing twice is harmless."""

    def __init__(self, slots: RunSlots) -> None:
        self._slots: RunSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.in_use -= 1
            self._slots = None


async def read_body(
    scope: Scope, receive: Receive, limit: int, within: float | None = DEFAULT_BODY_TIMEOUT_S
) -> bytes:
    """The whole request body, or ApiError(413) once it passes `limit` bytes, or ApiError(408)
    if it has not all arrived within `within` seconds (a client trickling it in holds a
    connection and a request task for as long as it likes otherwise)."""
    try:
        async with asyncio.timeout(within):
            return await _read_body(scope, receive, limit)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {within:g} s (moa serve --body-timeout)",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = _content_length(scope)
    too_large = ApiError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(moa serve --max-body-bytes)",
        code="request_too_large",
    )
    if declared is not None and declared > limit + _DISCARD_LIMIT:
        raise too_large  # not worth reading: we hang up after answering
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        size += len(body)
        if size > limit:
            if size > limit + _DISCARD_LIMIT:
                raise too_large
            continue
        chunks.append(body)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None
