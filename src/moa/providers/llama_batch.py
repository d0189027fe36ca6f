"""Continuous batching on the embedded model: many sequences decode together, one step at a time.

One scheduler thread owns the llama.cpp context. Each step it evaluates, in one batch, the next
token of every sequence that is generating plus a slice of the prompts still to be read, then
samples each sequence's next token with that sequence's own sampler chain. A request that
arrives while others run joins at the next step; a finished or cancelled sequence leaves at the
step it ends and its slot takes the next request.

On 2 CPU cores a step of n tokens costs far less than n steps of one (the weights are read once
per step), so n agents answering together finish sooner than one after another: see
BENCHMARKS.md for the measured gain.

Prompt sharing: a new sequence whose prompt starts like another sequence's evaluated tokens
(all proposers of a layer see the same conversation) gets those cells copied and evaluates only
the rest. When several requests with a common prefix arrive together, the first evaluates it
and the others wait one step for it.

Room: each of the `parallel` slots has a cache of `n_ctx` cells of its own (see
moa.providers.llama_model for why), so a sequence never crowds another; requests wait while
every slot is busy. A finished sequence's slot is free at once; its cells stay until another
sequence takes the slot, for a prompt that continues it (a staircase step continues the text
of the previous one).
"""

from __future__ import annotations

import codecs
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from moa.providers.llama_model import LlamaModel
from moa.results import TokenLogprob

__all__ = ["BatchStats", "Job", "Sampling", "Scheduler"]

#: Prefixes shorter than this are evaluated again rather than shared: a copy between caches
#: copies a whole cache (n_ctx cells), and waiting a step for a prefix costs a step.
_SHARE_MIN = 16


@dataclass(frozen=True, slots=True)
class Sampling:
    """One sequence's sampler settings; the defaults are llama-cpp-python's chat defaults."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0


@dataclass(eq=False)
class Job:
    """One request. `prompt` runs on the scheduler thread and returns the prompt's tokens and
    stop strings the model itself needs (an error it raises fails this job alone); `emit`
    receives, on that thread, ("text", str), ("logprobs", tuple), ("end", (finish_reason,
    completion_tokens)) or ("error", exception), and must not block."""

    prompt: Callable[[LlamaModel], tuple[list[int], tuple[str, ...]]]
    sampling: Sampling
    emit: Callable[[str, Any], None]
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    #: Alternatives recorded per token, or None for no log-probabilities.
    top_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchStats:
    """Counters for tests and benchmarks (read them between runs, not while one is going)."""

    #: Prompt tokens run through the model, and those a sequence got by sharing instead.
    prompt_tokens_evaluated: int = 0
    prompt_tokens_shared: int = 0
    steps: int = 0
    #: Most sequences decoded in one step.
    widest_step: int = 0


class _Text:
    """A sequence's answer as text: UTF-8 pieces joined across token boundaries, and text that
    may be the start of a stop string held back until it is known not to be one."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = stop
        self.text = ""
        self.sent = 0

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """New text safe to send, and whether a stop string has been met."""
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        self.text += self._decoder.decode(piece)
        cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._send(cut), True
        held = max(
            (n for s in self._stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])),
            default=0,
        )
        return self._send(len(self.text) - held), False

    def flush(self) -> str:
        self.text += self._decoder.decode(b"", final=True)
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        new = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new


class _Sequence:
    """A job admitted to a slot: its tokens (prompt, then answer) and how many are evaluated."""

    def __init__(
        self, job: Job, model: LlamaModel, prompt: list[int], stop: tuple[str, ...], limit: int
    ) -> None:
        self.job = job
        self.tokens = prompt
        self.prompt_length = len(prompt)
        room = limit - len(prompt)
        self.max_tokens = (
            room if not job.max_tokens or job.max_tokens <= 0 else min(job.max_tokens, room)
        )
        self.generated = 0
        self.n_past = 0
        self.slot = -1
        self.text = _Text(job.stop + stop)
        self.logprobs: list[TokenLogprob] = []
        self.chain = model.sampler(**asdict(job.sampling))

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.n_past

    def close(self, model: LlamaModel) -> None:
        if self.chain is not None:
            model.free_sampler(self.chain)
            self.chain = None


def _job(item: _Sequence | Job) -> Job:
    return item.job if isinstance(item, _Sequence) else item


class _Slot:
    """One of the context's sequence ids: busy with a sequence, holding a finished sequence's
    evaluated tokens for reuse (`cached`), or empty."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.sequence: _Sequence | None = None
        self.cached: list[int] = []
        self.finished_at = 0

    def evaluated(self) -> list[int]:
        if self.sequence is not None:
            return self.sequence.tokens[: self.sequence.n_past]
        return self.cached


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """The thread that owns one model and runs every job on it (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        parallel: int,
        n_threads: int,
        n_batch: int = 512,
        name: str = "llama",
    ) -> None:
        self._load = partial(
            LlamaModel, path, n_ctx=n_ctx, n_seq=parallel, n_batch=n_batch, n_threads=n_threads
        )
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._name = name
        self.stats = BatchStats()
        self._model: LlamaModel | None = None
        self._load_lock = threading.Lock()
        self._wake = threading.Condition()
        self._waiting: deque[_Sequence | Job] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._slots = [_Slot(i) for i in range(parallel)]
        self._order: list[_Sequence] = []  # running sequences, oldest first

    def model(self) -> LlamaModel:
        """The loaded model (loading it the first time): tokenizing may use it from any thread."""
        with self._load_lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the model is closed")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"llama-{self._name}", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._load_lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    # The scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            model = self.model()
        except BaseException as error:  # every waiting job learns why; the next one retries
            with self._wake:
                self._thread = None
            self._fail_all(error)
            return
        while True:
            with self._wake:
                while not self._waiting and not self._order and not self._closing:
                    self._wake.wait()
                if self._closing:
                    break
            self._drop_cancelled(model)
            self._admit(model)
            if self._order:
                self._step(model)
        self._fail_all(RuntimeError("the model was closed"))

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for item in waiting:
            _job(item).emit("error", error)
        for sequence in list(self._order):
            self._finish(sequence, error=error)

    def _drop_cancelled(self, model: LlamaModel) -> None:
        for sequence in [s for s in self._order if s.job.cancelled.is_set()]:
            self._release(model, sequence, keep=False)
        with self._wake:
            items = list(self._waiting)
            self._waiting = deque(i for i in items if not _job(i).cancelled.is_set())
        for item in items:
            if isinstance(item, _Sequence) and item.job.cancelled.is_set():
                item.close(model)

    def _admit(self, model: LlamaModel) -> None:
        """Give waiting jobs free slots, sharing the longest evaluated prefix there is."""
        deferred: list[_Sequence | Job] = []
        while True:
            with self._wake:
                if not self._waiting:
                    break
                item = self._waiting.popleft()
            if not any(slot.sequence is None for slot in self._slots):
                deferred.append(item)
                break
            sequence = item if isinstance(item, _Sequence) else self._prepare(model, item)
            if sequence is None:
                continue
            limit = len(sequence.tokens) - 1  # the last token is evaluated for its logits
            best, length = None, 0
            for slot in self._slots:
                common = min(_common(slot.evaluated(), sequence.tokens), limit)
                if common > length:
                    best, length = slot, common
            # A sequence admitted this very step (or still reading its prompt) is about to
            # evaluate a longer prefix of ours: wait a step and share it rather than repeat it.
            coming = max(
                (
                    min(_common(other.tokens[: other.prompt_length], sequence.tokens), limit)
                    for other in self._order
                ),
                default=0,
            )
            if coming - length >= _SHARE_MIN:
                deferred.append(sequence)
                continue
            slot = self._take_slot(best if best and best.sequence is None else None)
            if best is slot:  # a finished sequence's cache: keep what matches, drop the rest
                model.forget(slot.number, length)
            elif best is not None and length >= _SHARE_MIN:
                model.share(best.number, slot.number, length)
            else:
                model.forget(slot.number)
                length = 0
            slot.cached = []
            slot.sequence = sequence
            sequence.slot = slot.number
            sequence.n_past = length
            self.stats.prompt_tokens_shared += length
            self._order.append(sequence)
        with self._wake:
            self._waiting.extendleft(reversed(deferred))

    def _prepare(self, model: LlamaModel, job: Job) -> _Sequence | None:
        try:
            prompt, stop = job.prompt(model)
            if len(prompt) >= self._n_ctx:  # the job's own check should have said it better
                raise ValueError(f"a prompt of {len(prompt)} tokens in a context of {self._n_ctx}")
            return _Sequence(job, model, prompt, stop, self._n_ctx)
        except Exception as error:
            job.emit("error", error)
            return None

    def _take_slot(self, preferred: _Slot | None) -> _Slot:
        """A free slot: `preferred`, else one holding no cache, else the least recently used."""
        if preferred is not None:
            return preferred
        empty = [slot for slot in self._slots if slot.sequence is None]  # the caller checked
        fresh = [slot for slot in empty if not slot.cached]
        slot = fresh[0] if fresh else min(empty, key=lambda s: s.finished_at)
        slot.cached = []
        return slot

    def _step(self, model: LlamaModel) -> None:
        """Evaluate one batch, then sample for every sequence whose tokens are all evaluated."""
        while True:
            model.clear_batch()
            room = self._n_batch
            planned: list[tuple[_Sequence, int, int]] = []  # sequence, tokens taken, batch index
            # Sequences generating (one token each) first, then slices of prompts.
            for sequence in sorted(self._order, key=lambda s: s.pending > 1):
                take = min(sequence.pending, room)
                if take <= 0:
                    continue
                index = -1
                for j in range(take):
                    last = j == take - 1 and take == sequence.pending
                    index = model.add(
                        sequence.tokens[sequence.n_past + j],
                        sequence.n_past + j,
                        sequence.slot,
                        logits=last,
                    )
                planned.append((sequence, take, index if take == sequence.pending else -1))
                room -= take
            status = model.decode()
            if status == 0:
                break
            # Cannot happen while every sequence stays within its own cache; if it does, the
            # batch is lost and every cache is cleared, so the next requests start clean.
            error = RuntimeError(f"llama_decode failed with status {status}")
            for sequence in list(self._order):
                self._finish(sequence, error=error)
            model.clear()
            for slot in self._slots:
                slot.cached = []
            return
        self.stats.steps += 1
        self.stats.widest_step = max(self.stats.widest_step, len(planned))
        for sequence, take, index in planned:
            if sequence.generated == 0 and sequence.n_past < sequence.prompt_length:
                self.stats.prompt_tokens_evaluated += min(
                    take, sequence.prompt_length - sequence.n_past
                )
            sequence.n_past += take
            if index >= 0:
                self._next_token(model, sequence, index)

    def _next_token(self, model: LlamaModel, sequence: _Sequence, index: int) -> None:
        job = sequence.job
        if job.top_logprobs is not None:
            recorded = _logprob_of(model, index, job.top_logprobs)
        token = model.sample(sequence.chain, index)
        if model.is_end(token):
            self._finish(sequence, reason="stop", flush=True)
            return
        sequence.tokens.append(token)
        sequence.generated += 1
        if job.top_logprobs is not None:
            sequence.logprobs.append(recorded(token))
        text, stopped = sequence.text.feed(model.piece(token))
        if text:
            job.emit("text", text)
        if stopped:
            self._finish(sequence, reason="stop")
        elif sequence.generated >= sequence.max_tokens:
            self._finish(sequence, reason="length", flush=True)

    def _finish(
        self,
        sequence: _Sequence,
        *,
        reason: str = "",
        flush: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Tell the job how its sequence ended (text held back as a possible stop string is
        sent unless a stop string ended it), and free the slot."""
        job = sequence.job
        if error is None:
            rest = sequence.text.flush() if flush else ""
            if rest:
                job.emit("text", rest)
            if job.top_logprobs is not None:
                job.emit("logprobs", tuple(sequence.logprobs))
            job.emit("end", (reason, sequence.generated))
        else:
            job.emit("error", error)
        if self._model is not None:
            self._release(self._model, sequence, keep=error is None)

    def _release(self, model: LlamaModel, sequence: _Sequence, *, keep: bool) -> None:
        """Take a sequence out of its slot and free its sampler. With `keep`, its evaluated
        cells stay for a later prompt that starts the same way (a staircase step continues the
        previous one's text)."""
        sequence.close(model)
        if sequence in self._order:
            self._order.remove(sequence)
        slot = self._slots[sequence.slot]
        if slot.sequence is sequence:
            slot.sequence = None
            slot.finished_at = self.stats.steps
            if keep:
                slot.cached = sequence.tokens[: sequence.n_past]
            else:
                model.forget(slot.number)
                slot.cached = []


def _logprob_of(model: LlamaModel, index: int, top: int) -> Callable[[int], TokenLogprob]:
    """The model's own distribution at this step (raw logits, before penalties and
    temperature), and a function giving the chosen token's log-probability and alternatives."""
    import numpy as np

    # In float32, summed in float64: a third of the time of all-float64 (this runs for every
    # token of every sequence between two steps), and within 1e-9 of it.
    logits = model.logits(index)
    peak = logits.max()
    log_total = float(peak) + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    top = max(top, 1)
    best = np.argpartition(logits, -top)[-top:]
    ranked = sorted(((int(i), float(logits[i]) - log_total) for i in best), key=lambda t: -t[1])

    def piece(token: int) -> str:
        return model.piece(token).decode("utf-8", "replace")

    alternatives = tuple((piece(i), lp) for i, lp in ranked)

    def of(token: int) -> TokenLogprob:
        return TokenLogprob(piece(token), float(logits[token]) - log_total, alternatives)

    return of
