"""Any OpenAI-compatible chat endpoint, spoken to directly over aiohttp.

Why not the `openai` SDK: its request building, response models and httpx's connection pool
cost 1.4-2.8 ms of client CPU per call (non-streamed / streamed), which made `moa batch` and
`moa serve` CPU-bound on the client; aiohttp costs 0.2-0.3 ms for the same calls
(benchmarks/http_clients.py, figures in BENCHMARKS.md). It also freed the package from the
SDK's narrow version range. The protocol we need is small: one POST, a JSON body back or a
stream of server-sent events (decoded by moa.providers.sse), and the error statuses.

One aiohttp session (and connection pool) per provider and event loop; no HTTP-level retries:
the core runs the one retry loop, so attempts are counted and backoff is decided in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp

from moa._secrets import clip
from moa._version import __version__
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
from moa.providers.base import ChatRequest, Completion, ProviderBase, StreamChunk
from moa.providers.sse import SSEDecoder
from moa.results import TokenLogprob, Usage

__all__ = ["OpenAICompatibleProvider", "parse_retry_after"]

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
#: ChatRequest fields sent as they are when set. repeat_penalty and min_p are not among them:
#: the config refuses them for HTTP providers (see moa.config._EXTRA_SETTINGS).
_SENT_IF_SET = (
    "temperature",
    "max_tokens",
    "top_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "user",
)


class OpenAICompatibleProvider(ProviderBase):
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        context_window: int | None = None,
        continuation: str | None = None,
    ) -> None:
        self.name = name
        #: How the server continues a partial answer (ProviderConfig.continuation).
        self._continuation = continuation
        self.base_url = base_url
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._context_window = context_window
        # With no key we send no Authorization header at all (never "Bearer None"); nor do we
        # send organisation or project headers taken from the environment.
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"mixture-of-agents/{__version__}",
        }
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._proxy = _env_proxy(self._url)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closer: AsyncGenerator[None, None] | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The session for this event loop.

        Pooled connections belong to the loop that opened them, so a caller who runs us from a
        new loop (two `asyncio.run` calls, say) gets a new session instead of dead sockets.
        aiohttp's pool finds a free connection by host key, so one session serves any number
        of calls at once without the per-request pool scan that made httpx need several.
        """
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop or self._session.closed:
            self._session = aiohttp.ClientSession(
                # No cap here: max_concurrency / rpm / tpm are the core's (moa.providers.limits).
                connector=aiohttp.TCPConnector(limit=0),
                # Not trust_env: it looks the proxy up again on every request, in a thread,
                # which doubled our CPU per call; self._proxy is looked up once instead.
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._session_loop = loop
            # A session must be closed on its own loop, and a caller of `asyncio.run` may never
            # call aclose there. asyncio.run and asyncio.Runner close the async generators
            # still open as their loop ends: this one closes the session then.
            self._closer = _close_at_loop_end(self._session)
            with contextlib.suppress(StopIteration):
                self._closer.asend(None).send(None)  # started: it waits at its `yield`
        return self._session

    def __repr__(self) -> str:
        return f"OpenAICompatibleProvider(name={self.name!r}, base_url={self.base_url!r})"

    def context_window(self, model: str) -> int | None:
        return self._context_window

    async def aclose(self) -> None:
        session, loop = self._session, self._session_loop
        self._session, self._session_loop = None, None
        if session is not None and loop is asyncio.get_running_loop():
            await session.close()
        # A session of a finished loop was closed as that loop ended (see _client).

    def _body(self, request: ChatRequest, *, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
        for key in _SENT_IF_SET:
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        if request.stop:
            body["stop"] = list(request.stop)
        if request.logprobs:
            body["logprobs"] = True
            if request.top_logprobs:
                body["top_logprobs"] = request.top_logprobs
        if request.continue_final and self._continuation == "continue_final_message":
            # vLLM: extend the trailing assistant message instead of opening a new turn.
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    async def _post(self, request: ChatRequest, *, stream: bool) -> aiohttp.ClientResponse:
        """Send the request; the caller reads and releases the response.

        The timeout bounds connecting and each wait for data (as the SDK's did), not the whole
        answer: a long stream that keeps sending is not cut; the core enforces the deadlines.
        """
        timeout = aiohttp.ClientTimeout(
            total=None, connect=request.timeout, sock_read=request.timeout
        )
        headers = self._headers
        if stream:
            headers = {**headers, "Accept": "text/event-stream"}
        response = await self._client().post(
            self._url,
            data=self._body(request, stream=stream),
            headers=headers,
            timeout=timeout,
            proxy=self._proxy,
        )
        if response.status >= 400:
            try:
                raw = await response.read()
            finally:
                response.release()
            raise self._status_error(
                response.status, response.reason, response.headers, raw, request.model
            )
        return response

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            response = await self._post(request, stream=False)
            try:
                raw = await response.read()
            finally:
                response.release()
        except Exception as error:
            raise self._translate(error, request.model) from None
        return self._parse_completion(raw, request.model)

    def _parse_completion(self, raw: bytes, model: str) -> Completion:
        """Read a chat completion body: the three fields we use, checked."""

        def malformed(why: str) -> MalformedResponse:
            return self._malformed(why, model, raw.decode("utf-8", "replace"))

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
            logprobs=_logprobs(choices[0].get("logprobs")),
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        model = request.model
        try:
            response = await self._post(request, stream=True)
        except Exception as error:
            raise self._translate(error, model) from None
        received: list[str] = []
        finished = done = False
        try:
            decoder = SSEDecoder()
            async for piece in response.content.iter_any():
                for event in decoder.feed(piece):
                    if event.data == "[DONE]":
                        done = True
                        break
                    chunk = self._parse_chunk(event.data, model)
                    if chunk is None:
                        continue
                    if chunk.finish_reason:
                        finished = True
                    if chunk.text:
                        received.append(chunk.text)
                    yield chunk
                if done:
                    break
        except Exception as error:
            translated = self._translate(error, model)
            if received:
                raise self._interrupted(
                    f"the stream broke after {len(''.join(received))} characters: {translated}",
                    received,
                    model,
                ) from None
            raise translated from None
        finally:
            # A stream read to its end gives its connection back to the pool; one the reader
            # left early (or that broke) is closed, which also ends the request upstream.
            if done:
                response.release()
            else:
                response.close()
        if not finished:
            message = "the stream ended without a finish_reason"
            if received:
                raise self._interrupted(message, received, model)
            raise self._malformed(message, model)

    def _parse_chunk(self, data: str, model: str) -> StreamChunk | None:
        """One `chat.completion.chunk` event; None when it carries nothing we use."""
        not_a_chunk = "a stream event is not a chat completion chunk"
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._malformed("unreadable stream event: not JSON", model, data) from None
        if not isinstance(chunk, dict):
            raise self._malformed(not_a_chunk, model)
        if "error" in chunk:  # some servers report a failure mid-stream this way
            message = _error_message(data)
            raise self._malformed(f"the stream carried an error: {message}", model, data)
        text = ""
        reason = None
        logprobs = None
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            text = content if isinstance(content, str) else ""
            finish = choices[0].get("finish_reason")
            reason = finish if isinstance(finish, str) and finish else None
            logprobs = _logprobs(choices[0].get("logprobs"))
        elif choices is not None and not isinstance(choices, list):
            raise self._malformed(not_a_chunk, model)
        raw_usage = chunk.get("usage")
        usage = _usage_from_dict(raw_usage) if isinstance(raw_usage, dict) else None
        if text or reason or usage or logprobs:
            return StreamChunk(text=text, finish_reason=reason, usage=usage, logprobs=logprobs)
        return None

    def _malformed(self, why: str, model: str, body: str | None = None) -> MalformedResponse:
        clipped = None if body is None else clip(body, _BODY_LIMIT)
        return MalformedResponse(why, provider=self.name, model=model, body=clipped)

    def _interrupted(self, message: str, received: list[str], model: str) -> StreamInterrupted:
        partial = "".join(received)
        return StreamInterrupted(message, partial=partial, provider=self.name, model=model)

    def _status_error(
        self, status: int, reason: str | None, headers: Mapping[str, str], raw: bytes, model: str
    ) -> ProviderStatusError:
        where: dict[str, Any] = {"provider": self.name, "model": model}
        text = raw.decode("utf-8", "replace")
        body = clip(text, _BODY_LIMIT)
        message = f"HTTP {status}: {_error_message(text, reason)}"
        # Retry-After means something on a 429 and a 503 (RFC 9110); elsewhere it is ignored.
        retry_after = parse_retry_after(headers) if status in (429, 503) else None
        if status == 429:
            return RateLimited(message, retry_after=retry_after, body=body, **where)
        if status in (400, 413, 422) and any(s in body.lower() for s in _CONTEXT_SIGNS):
            return ContextLengthExceeded(message, status_code=status, body=body, **where)
        # A 503 is the server's trouble, not our rate: its Retry-After is obeyed by the retry
        # loop, but the provider's limits are not halved as after a 429.
        return ProviderStatusError(
            message, status_code=status, retry_after=retry_after, body=body, **where
        )

    def _translate(self, error: BaseException, model: str) -> ProviderError:
        """Map transport exceptions onto our tree, keeping no reference to the client."""
        where: dict[str, Any] = {"provider": self.name, "model": model}
        if isinstance(error, ProviderError):
            return error
        if isinstance(error, TimeoutError):  # aiohttp's connect and read timeouts included
            return ProviderTimeout("the request timed out", **where)
        if isinstance(error, aiohttp.ClientPayloadError):  # a body cut short
            return ProviderConnectionError(
                f"connection failed: the response body was cut short ({error})", **where
            )
        if isinstance(error, aiohttp.ClientError | OSError):
            return ProviderConnectionError(
                f"connection failed: {type(error).__name__}: {error}", **where
            )
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


def _env_proxy(url: str) -> str | None:
    """The proxy that HTTP(S)_PROXY / NO_PROXY name for `url`, as the SDK honoured them."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _logprobs(data: Any) -> tuple[TokenLogprob, ...] | None:
    """A choice's `logprobs` object ({"content": [{token, logprob, top_logprobs}, ...]}), or None
    when it is missing or not of that shape: a server that ignores the field is not an error,
    the strategy that wanted the numbers falls back (see moa.strategies)."""
    content = data.get("content") if isinstance(data, dict) else None
    if not isinstance(content, list):
        return None
    tokens: list[TokenLogprob] = []
    for item in content:
        if not isinstance(item, dict):
            return None
        logprob = item.get("logprob")
        if not isinstance(logprob, int | float):
            return None
        top = item.get("top_logprobs") or []
        alternatives = tuple(
            (str(t.get("token", "")), float(t["logprob"]))
            for t in top
            if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
        )
        tokens.append(TokenLogprob(str(item.get("token", "")), float(logprob), alternatives))
    return tuple(tokens)


def _usage_from_dict(usage: dict[str, Any]) -> Usage | None:
    try:
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None


def _error_message(text: str, reason: str | None = None) -> str:
    """The `error.message` of an OpenAI-style error body, else a clip of the text, else the
    HTTP `reason`."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    inner = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(inner, dict) and inner.get("message"):
        return clip(str(inner["message"]), _BODY_LIMIT)
    if isinstance(inner, str) and inner:
        return clip(inner, _BODY_LIMIT)
    return clip(text.strip(), 200) or (reason or "")


async def _close_at_loop_end(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await session.close()
