"""Any OpenAI-compatible chat endpoint, through the official `openai` SDK.

One `AsyncOpenAI` client per provider, so connections are pooled and reused across calls.
The SDK's own retries are off: the core runs the one retry loop, so attempts are counted and
backoff is decided in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import ssl
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from moa._secrets import clip
from moa.errors import (
    ContextLengthExceeded,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
)
from moa.providers.base import ChatMessage, ChatRequest, Completion, StreamChunk, estimate_tokens
from moa.results import Usage

__all__ = ["OpenAICompatibleProvider", "parse_retry_after"]

#: Calls in flight on one SDK client before another is opened, and the most clients a provider
#: keeps (see OpenAICompatibleProvider._shard).
SHARD_CALLS = 16
MAX_SHARDS = 32


@dataclass(slots=True)
class _Shard:
    client: openai.AsyncOpenAI
    in_flight: int = 0


_CONTEXT_SIGNS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "reduce the length",
)
_BODY_LIMIT = 500


class OpenAICompatibleProvider:
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        context_window: int | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self._context_window = context_window
        self._api_key = api_key
        # With no key we send no Authorization header at all (never "Bearer None"), and an
        # explicit "" stops the SDK from picking up OPENAI_API_KEY meant for another endpoint.
        self._extra_headers: dict[str, Any] = {} if api_key else {"Authorization": openai.omit}
        # Nor do we forward OPENAI_ORG_ID / OPENAI_PROJECT_ID, which the SDK reads by default.
        self._default_headers: Any = {
            "OpenAI-Organization": openai.omit,
            "OpenAI-Project": openai.omit,
        }
        self._shards: list[_Shard] = []
        self._shards_loop: asyncio.AbstractEventLoop | None = None
        self._ssl_context: ssl.SSLContext | None = None

    def _shard(self) -> _Shard:
        """The SDK client (and connection pool) for the next call.

        Pooled connections belong to the loop that opened them, so a caller who runs us from a
        new loop (two `asyncio.run` calls, say) gets new clients instead of dead sockets.

        The HTTP pool scans every one of its connections on each request and each release,
        so one pool serving hundreds of calls at once spends most of the CPU there (about a
        third of `moa serve`'s under 100 streaming clients, by py-spy). Calls therefore go to
        the least busy of several clients, and a new one is opened only when every client
        already has SHARD_CALLS in flight: a single `moa ask` never uses more than one.
        """
        loop = asyncio.get_running_loop()
        if self._shards_loop is not loop:
            self._shards, self._shards_loop = [], loop
        shard = min(self._shards, key=lambda s: s.in_flight, default=None)
        if shard is None or (shard.in_flight >= SHARD_CALLS and len(self._shards) < MAX_SHARDS):
            shard = _Shard(self._new_client())
            self._shards.append(shard)
        return shard

    def _new_client(self) -> openai.AsyncOpenAI:
        # Building an SSL context costs tens of milliseconds of blocking work: do it once.
        if self._ssl_context is None:
            self._ssl_context = httpx2.create_ssl_context()
        return openai.AsyncOpenAI(
            api_key=self._api_key or "",
            base_url=self.base_url,
            max_retries=0,
            default_headers=self._default_headers,
            http_client=openai.DefaultAsyncHttpxClient(verify=self._ssl_context),
            # A keyless local server (Ollama, vLLM, llama.cpp) is legitimate; the SDK's own
            # "missing credentials" check would refuse it.
            _enforce_credentials=bool(self._api_key),
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleProvider(name={self.name!r}, base_url={self.base_url!r})"

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return estimate_tokens(messages)

    def context_window(self, model: str) -> int | None:
        return self._context_window

    async def aclose(self) -> None:
        shards, loop = self._shards, self._shards_loop
        self._shards, self._shards_loop = [], None
        if loop is asyncio.get_running_loop():
            await asyncio.gather(*(shard.client.close() for shard in shards))
        # Clients of a finished loop cannot be closed from this one; their sockets went with it.

    async def _post(self, client: openai.AsyncOpenAI, request: ChatRequest, *, stream: bool) -> Any:
        """POST /chat/completions through the SDK's low-level `post`.

        `chat.completions.create` first walks the whole request through the SDK's TypedDict
        transform, which costs more CPU than the HTTP exchange itself (4.2 vs 2.6 ms a call,
        measured against the fake server); our messages are already plain JSON, so we skip
        it. Auth, base URL, timeouts, error classes and SSE parsing are still the SDK's.
        """
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
        for key in ("temperature", "max_tokens", "top_p", "seed"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        options: Any = {}  # the SDK's RequestOptions TypedDict
        if request.timeout is not None:
            options["timeout"] = request.timeout
        if self._extra_headers:
            options["headers"] = self._extra_headers
        if not stream:
            return await client.post("/chat/completions", cast_to=bytes, body=body, options=options)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return await client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=body,
            options=options,
            stream=True,
            stream_cls=openai.AsyncStream[ChatCompletionChunk],
        )

    async def complete(self, request: ChatRequest) -> Completion:
        shard = self._shard()
        shard.in_flight += 1
        try:
            response: Any = await self._post(shard.client, request, stream=False)
        except Exception as error:
            raise self._translate(error, request.model) from None
        finally:
            shard.in_flight -= 1
        return self._parse_completion(response, request.model)

    def _parse_completion(self, raw: bytes, model: str) -> Completion:
        """Read a chat completion body ourselves: building the SDK's pydantic models for it
        took a tenth of a whole MoA run's CPU, for the three fields we use."""

        def malformed(why: str) -> MalformedResponse:
            text = raw.decode("utf-8", "replace")
            return MalformedResponse(why, provider=self.name, model=model, body=_clip(text))

        try:
            data = json.loads(raw)
        except ValueError:
            raise malformed("the response is not JSON") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise malformed("the response is not a chat completion with choices")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise malformed("the message content is not text")
        reason = choices[0].get("finish_reason")
        usage = data.get("usage")
        return Completion(
            text=content or "",
            finish_reason=reason if isinstance(reason, str) else None,
            usage=_usage_from_dict(usage) if isinstance(usage, dict) else None,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        shard = self._shard()
        shard.in_flight += 1
        try:
            # aclosing: a reader that stops early must end the HTTP stream now, not at GC.
            async with contextlib.aclosing(self._stream(shard.client, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            shard.in_flight -= 1

    async def _stream(
        self, client: openai.AsyncOpenAI, request: ChatRequest
    ) -> AsyncGenerator[StreamChunk, None]:
        try:
            stream: Any = await self._post(client, request, stream=True)
        except Exception as error:
            raise self._translate(error, request.model) from None
        received: list[str] = []
        finished = False
        try:
            async for chunk in stream:
                if not isinstance(chunk, ChatCompletionChunk):
                    raise MalformedResponse(
                        "a stream event is not a chat completion chunk",
                        provider=self.name,
                        model=request.model,
                    )
                text = ""
                reason = None
                if chunk.choices:
                    choice = chunk.choices[0]
                    text = choice.delta.content or "" if choice.delta else ""
                    reason = choice.finish_reason
                usage = _usage(chunk.usage)
                if reason:
                    finished = True
                if text:
                    received.append(text)
                if text or reason or usage:
                    yield StreamChunk(text=text, finish_reason=reason, usage=usage)
        except Exception as error:
            translated = self._translate(error, request.model)
            if received:
                raise StreamInterrupted(
                    f"the stream broke after {len(''.join(received))} characters: {translated}",
                    partial="".join(received),
                    provider=self.name,
                    model=request.model,
                ) from None
            raise translated from None
        finally:
            await stream.close()
        if not finished:
            message = "the stream ended without a finish_reason"
            if received:
                raise StreamInterrupted(
                    message, partial="".join(received), provider=self.name, model=request.model
                )
            raise MalformedResponse(message, provider=self.name, model=request.model)

    def _translate(self, error: Exception, model: str) -> ProviderError:
        """Map SDK and transport exceptions onto our tree, keeping no reference to the client."""
        where: dict[str, Any] = {"provider": self.name, "model": model}
        if isinstance(error, ProviderError):
            return error
        if isinstance(error, openai.APITimeoutError):
            return ProviderTimeout("the request timed out", **where)
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return ProviderConnectionError(
                f"connection failed: {type(cause).__name__}: {cause}", **where
            )
        if isinstance(error, openai.APIResponseValidationError):
            return MalformedResponse(f"invalid response: {error.message}", **where)
        if isinstance(error, openai.APIStatusError):
            status = error.response.status_code
            body = _clip(_body_text(error))
            message = f"HTTP {status}: {_error_message(error)}"
            if status == 429:
                return RateLimited(
                    message,
                    retry_after=parse_retry_after(error.response.headers),
                    body=body,
                    **where,
                )
            if status in (400, 413, 422) and any(s in (body or "").lower() for s in _CONTEXT_SIGNS):
                return ContextLengthExceeded(message, status_code=status, body=body, **where)
            retry_after = parse_retry_after(error.response.headers)
            if status == 503 and retry_after is not None:
                return RateLimited(
                    message, retry_after=retry_after, body=body, status_code=503, **where
                )
            return ProviderStatusError(message, status_code=status, body=body, **where)
        if isinstance(error, json.JSONDecodeError):
            return MalformedResponse(f"unreadable response: {error}", **where)
        if isinstance(error, httpx2.HTTPError | OSError):
            # Transport errors raised while iterating a stream bypass the SDK's wrapping.
            return ProviderConnectionError(f"{type(error).__name__}: {error}", **where)
        raise error  # a bug, not an upstream failure: never retried or hidden


def parse_retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `Retry-After` (seconds or date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    return Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))


def _usage_from_dict(usage: dict[str, Any]) -> Usage | None:
    try:
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None


def _body_text(error: openai.APIStatusError) -> str:
    try:
        return error.response.text
    except Exception:  # a streamed response whose body was never read
        return str(error.body or "")


def _error_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return clip(str(inner["message"]), _BODY_LIMIT)
        if isinstance(inner, str):
            return clip(inner, _BODY_LIMIT)
    text = _body_text(error).strip()
    return clip(text, 200) if text else error.response.reason_phrase


def _clip(text: str | None) -> str | None:
    # Redacted before it is cut: a cut through a key would leave its head unrecognised.
    return None if text is None else clip(text, _BODY_LIMIT)
