"""A fake OpenAI-compatible chat server on loopback, for tests and benchmarks.

It speaks real HTTP (uvicorn in a background thread, or its own process via
`python -m moa.testing.fake_server`), answers `POST /v1/chat/completions` streamed or not, and
is scriptable per model: latency, status codes and headers, malformed bodies, streams cut
midway, calls that hang. Every request is recorded with its body, headers, timing and whether
the client hung up before the answer was complete.

    with FakeOpenAIServer() as server:
        server.script("m1", Reply(status=500), Reply(status=500), Reply(text="fine"))
        ... point a provider at server.base_url ...
        assert server.requests[-1].model == "m1"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from moa.errors import MissingExtraError

    raise MissingExtraError(
        "moa.testing's fake server", "server", error.name or "starlette"
    ) from None

__all__ = ["FakeOpenAIServer", "RecordedRequest", "Reply"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Unset text means the default: '<model> answer <n>'."""

    text: str | None = None
    #: Seconds before the response starts (before the first chunk when streaming).
    latency: float = 0.0
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: A raw body to send instead of a chat completion (HTML, broken JSON, an error object).
    body: str | None = None
    content_type: str = "application/json"
    #: Sleep this long before answering, noticing if the client hangs up meanwhile.
    hang: float | None = None
    finish_reason: str = "stop"
    #: Streaming: seconds between chunks, and how many chunks to send before dropping the
    #: connection (None: send everything). Not streaming: any value sends half the body.
    chunk_delay: float = 0.0
    cut_after_chunks: int | None = None
    #: Send `"content": null` instead of text.
    null_content: bool = False
    usage: tuple[int, int] | None = None
    #: When the request asks for `logprobs`: every token (a chunk of `chunk_size` characters)
    #: gets this log-probability; asked `top_logprobs: k`, it comes first among k alternatives
    #: that share the rest of the probability equally. None answers `"logprobs": null`, as a
    #: server that does not support them would.
    logprob: float | None = None


@dataclass
class RecordedRequest:
    body: dict[str, Any]
    headers: dict[str, str]
    started: float
    ended: float | None = None
    #: The client closed the connection before the answer was complete.
    disconnected: bool = False

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def text(self) -> str:
        """All message contents of the request, joined: handy for `in` checks."""
        return "\n".join(str(m.get("content", "")) for m in self.messages)


Responder = Callable[[dict[str, Any], int], Reply]


class FakeOpenAIServer:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Reply | None = None,
        chunk_size: int = 8,
    ) -> None:
        self.host = host
        self.port = port
        self.default = default or Reply()
        self.chunk_size = chunk_size
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._responders: dict[str, Responder] = {}
        self._counts: dict[str, itertools.count[int]] = defaultdict(itertools.count)
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    # --- scripting ------------------------------------------------------------------------

    def script(self, model: str, *replies: Reply) -> None:
        """Queue replies for `model` ("*" for any model); each is used once, then the default."""
        with self._lock:
            self._scripts[model].extend(replies)

    def respond(self, model: str, responder: Responder) -> None:
        """Answer every request for `model` with `responder(body, n)`, n counting from 0."""
        with self._lock:
            self._responders[model] = responder

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._scripts.clear()
            self._responders.clear()
            self._counts.clear()
            self.in_flight = self.max_in_flight = 0

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def _next_reply(self, body: dict[str, Any]) -> tuple[Reply, int]:
        model = str(body.get("model", ""))
        with self._lock:
            n = next(self._counts[model])
            for key in (model, "*"):
                if self._scripts[key]:
                    return self._scripts[key].popleft(), n
            responder = self._responders.get(model) or self._responders.get("*")
        if responder is not None:
            return responder(body, n), n
        return self.default, n

    # --- HTTP -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            return JSONResponse({"error": {"message": "invalid JSON"}}, status_code=400)
        record = RecordedRequest(body=body, headers=dict(request.headers), started=time.monotonic())
        with self._lock:
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        reply, n = self._next_reply(body)
        streaming_started = False
        try:
            wait = (reply.hang or 0.0) + reply.latency
            if wait and not await self._wait(request, wait, record):
                return Response(status_code=499)
            if reply.body is not None or reply.status != 200:
                payload = (
                    reply.body
                    if reply.body is not None
                    else json.dumps(
                        {"error": {"message": f"scripted status {reply.status}", "type": "fake"}}
                    )
                )
                return Response(
                    payload,
                    status_code=reply.status,
                    headers=reply.headers,
                    media_type=reply.content_type,
                )
            text = reply.text if reply.text is not None else f"{record.model} answer {n}"
            if body.get("stream"):
                streaming_started = True
                return StreamingResponse(
                    self._sse(request, record, reply, text),
                    media_type="text/event-stream",
                    headers=reply.headers,
                )
            if reply.cut_after_chunks is not None:  # a body that stops short of its length
                streaming_started = True
                whole = json.dumps(self._completion(record, reply, text)).encode()
                return StreamingResponse(
                    self._truncated(whole, record),
                    media_type="application/json",
                    headers={**reply.headers, "content-length": str(len(whole))},
                )
            return JSONResponse(self._completion(record, reply, text), headers=reply.headers)
        finally:
            if not streaming_started:
                self._finish(record)

    def _finish(self, record: RecordedRequest) -> None:
        with self._lock:
            if record.ended is None:
                record.ended = time.monotonic()
                self.in_flight -= 1

    async def _wait(self, request: Request, seconds: float, record: RecordedRequest) -> bool:
        """Sleep exactly `seconds`, unless the client hangs up first. False if it did.

        The body has been read, so the next ASGI message can only be the disconnect.
        """
        try:
            message = await asyncio.wait_for(request.receive(), timeout=seconds)
        except TimeoutError:
            return True
        if message["type"] == "http.disconnect":
            record.disconnected = True
            return False
        return True  # pragma: no cover - no other message follows a fully read body

    def _usage(self, record: RecordedRequest, reply: Reply, text: str) -> dict[str, int]:
        prompt, completion = reply.usage or (len(record.text) // 4 + 1, len(text) // 4 + 1)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _logprobs(self, record: RecordedRequest, reply: Reply, pieces: list[str]) -> Any:
        """The choice's `logprobs` object for these tokens, or None (not asked, not scripted)."""
        if not record.body.get("logprobs") or reply.logprob is None:
            return None
        k = int(record.body.get("top_logprobs") or 0)
        rest = 1.0 - math.exp(reply.logprob)
        other = math.log(rest / (k - 1)) if k > 1 and rest > 0 else -100.0
        content = []
        for piece in pieces:
            top = [{"token": piece, "logprob": reply.logprob}] if k else []
            top += [{"token": f"<alt{j}>", "logprob": other} for j in range(1, k)]
            content.append({"token": piece, "logprob": reply.logprob, "top_logprobs": top})
        return {"content": content}

    def _pieces(self, text: str) -> list[str]:
        return [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)]

    def _completion(self, record: RecordedRequest, reply: Reply, text: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None if reply.null_content else text,
                    },
                    "finish_reason": reply.finish_reason,
                    "logprobs": self._logprobs(record, reply, self._pieces(text)),
                }
            ],
            "usage": self._usage(record, reply, text),
        }

    async def _truncated(self, payload: bytes, record: RecordedRequest) -> AsyncIterator[bytes]:
        try:
            yield payload[: len(payload) // 2]
            raise ConnectionAbortedError("scripted cut")
        finally:
            self._finish(record)

    async def _sse(
        self, request: Request, record: RecordedRequest, reply: Reply, text: str
    ) -> AsyncIterator[bytes]:
        def event(
            delta: dict[str, Any],
            finish: str | None = None,
            usage: Any = None,
            logprobs: Any = None,
        ) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": record.model,
                "choices": [] if usage else [choice],
            }
            if usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        pieces = self._pieces(text)
        try:
            yield event({"role": "assistant", "content": ""})
            for number, piece in enumerate(pieces):
                if reply.cut_after_chunks is not None and number >= reply.cut_after_chunks:
                    raise ConnectionAbortedError("scripted cut")  # uvicorn drops the connection
                if reply.chunk_delay and not await self._wait(request, reply.chunk_delay, record):
                    return
                content = None if reply.null_content else piece
                yield event({"content": content}, logprobs=self._logprobs(record, reply, [piece]))
            if reply.cut_after_chunks is not None and reply.cut_after_chunks >= len(pieces):
                raise ConnectionAbortedError("scripted cut")
            yield event({}, finish=reply.finish_reason)
            if (record.body.get("stream_options") or {}).get("include_usage"):
                yield event({}, usage=self._usage(record, reply, text))
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            record.disconnected = True
            raise
        finally:
            self._finish(record)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="critical",  # scripted faults would log tracebacks
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        socket = self._server.servers[0].sockets[0]
        self.port = socket.getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Run the fake server in the foreground (benchmarks start it as a separate process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--text", default=None, help="the answer (default: '<model> answer <n>')")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAIServer(
        host=args.host,
        port=args.port,
        default=Reply(text=args.text, latency=args.latency, chunk_delay=args.chunk_delay),
    )
    server.start()
    print(f"listening {server.base_url}", flush=True)
    try:
        while server._thread is not None and server._thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
