"""A GGUF model and one multi-sequence llama.cpp context, through llama-cpp-python's C API.

Only what the batch scheduler (moa.providers.llama_batch) needs: tokenizing, token pieces, the
chat template, one decode over a batch of tokens from many sequences, and per-sequence KV-cache
operations. The high-level `llama_cpp.Llama` owns a context of one sequence, so it cannot serve
here; every call below is a plain function of llama.h.

Not thread-safe: the scheduler thread is the only user of the context (tokenizing only reads the
vocabulary, so other threads may call `tokenize`).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

from moa.errors import ConfigError, MissingExtraError, ProviderError

__all__ = ["LlamaModel", "import_llama_cpp"]

#: llama-cpp-python's default for the repeat/frequency/presence penalties' window: the same as
#: the high-level API, so a sequence samples as `Llama.create_chat_completion` did.
_PENALTY_LAST_N = 64


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError(
            "the embedded llama.cpp provider", "local", "llama-cpp-python"
        ) from None
    # Batched decoding needs per-sequence cache operations on one shared pool of cells.
    if not hasattr(llama_cpp, "llama_memory_seq_cp") or not any(
        name == "kv_unified" for name, *_ in llama_cpp.llama_context_params._fields_
    ):
        raise MissingExtraError(
            "batched decoding on the embedded model", "local", "llama-cpp-python>=0.3.36"
        )
    # llama.cpp logs every load to stderr unless llama-cpp-python's logger is told to be quiet
    # (what `Llama(verbose=False)` does).
    logger = logging.getLogger("llama-cpp-python")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    return llama_cpp


class LlamaModel:
    """The loaded weights, their vocabulary and one context with `n_seq` sequences of `n_ctx`
    cells each.

    Each sequence has a KV cache of its own (llama.cpp's `kv_unified` off): its attention runs
    over its own cells only, exactly as when it is alone, so its answer is the same token for
    token whatever else is in the batch. With one cache shared by all sequences, attention
    spans the others' (masked) cells too, which changes the order of floating-point sums: on
    SmolLM2-135M, greedy answers then parted ways within a few tokens (measured).
    """

    def __init__(self, path: Path, *, n_ctx: int, n_seq: int, n_batch: int, n_threads: int) -> None:
        lib = self.lib = import_llama_cpp()
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load {path}: is it a GGUF model file?")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        settings = lib.llama_context_default_params()
        settings.n_ctx = n_ctx * n_seq
        settings.n_batch = n_batch
        settings.n_ubatch = n_batch
        settings.n_seq_max = n_seq
        settings.n_threads = n_threads
        settings.n_threads_batch = n_threads
        settings.kv_unified = False
        # As llama-cpp-python's Llama sets it (llama.h's default, "auto", picks flash attention
        # where it can): a greedy answer stays the one the model gave before batching.
        settings.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        settings.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, settings)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ProviderError(
                f"llama.cpp could not make a context of {n_seq} x {n_ctx} tokens: "
                "lower parallel or n_ctx"
            )
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.batch_size = 0

    # Vocabulary ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode()
        room = len(data) + 8  # a token covers at least one byte: room for any text's tokens
        buffer = (self.lib.llama_token * room)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, room, add_bos, special)
        if n < 0:  # cannot happen, but llama.h allows it: -n is the room needed
            room = -n
            buffer = (self.lib.llama_token * room)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, room, add_bos, special)
        return list(buffer[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def token_text(self, token: int) -> str:
        """A special token's text as a chat template writes it ("" when the model has none)."""
        return "" if token < 0 else bytes(self.lib.llama_vocab_get_text(self.vocab, token)).decode()

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    @property
    def eos(self) -> int:
        return int(self.lib.llama_vocab_eos(self.vocab))

    @property
    def bos(self) -> int:
        return int(self.lib.llama_vocab_bos(self.vocab))

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        buffer = ctypes.create_string_buffer(size)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buffer, size)
        if n < 0:
            return None
        if n >= size:
            buffer = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buffer, n + 1)
        return buffer.value.decode("utf-8", "replace")

    # Decoding ----------------------------------------------------------------------------------

    def clear_batch(self) -> None:
        self.batch_size = 0

    def add(self, token: int, position: int, sequence: int, *, logits: bool) -> int:
        """Append one token of one sequence to the batch; returns its index in the batch."""
        i = self.batch_size
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = logits
        self.batch_size = i + 1
        return i

    def decode(self) -> int:
        """0 on success, 1 when the cache has no room for the batch (nothing was changed),
        anything else on failure."""
        self.batch.n_tokens = self.batch_size
        return int(self.lib.llama_decode(self.ctx, self.batch))

    def logits(self, index: int) -> Any:
        import numpy as np

        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def forget(self, sequence: int, start: int = 0) -> None:
        """Drop a sequence's cells from position `start` on (cells another sequence shares stay)."""
        self.lib.llama_memory_seq_rm(self.memory, sequence, start, -1)

    def share(self, source: int, target: int, length: int) -> None:
        """Give `target` the first `length` positions of `source`. Between caches llama.cpp
        copies whole ones only (a partial copy aborts the process), so copy all and cut."""
        self.lib.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        self.lib.llama_memory_seq_rm(self.memory, target, length, -1)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    # Sampling ----------------------------------------------------------------------------------

    def sampler(
        self,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        repeat_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
        seed: int,
    ) -> Any:
        """A sampler chain built as `Llama.create_chat_completion` builds its own: penalties,
        then greedy at temperature 0, else top-k, typical (off), top-p, min-p, temperature and a
        seeded draw."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(
            chain,
            lib.llama_sampler_init_penalties(
                self.n_vocab, _PENALTY_LAST_N, repeat_penalty, frequency_penalty, presence_penalty
            ),
        )
        if temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        for sampler in (
            lib.llama_sampler_init_top_k(top_k),
            lib.llama_sampler_init_typical(1.0, 1),
            lib.llama_sampler_init_top_p(top_p, 1),
            lib.llama_sampler_init_min_p(min_p, 1),
            lib.llama_sampler_init_temp(temperature),
            lib.llama_sampler_init_dist(seed),
        ):
            lib.llama_sampler_chain_add(chain, sampler)
        return chain

    def sample(self, chain: Any, index: int) -> int:
        return int(self.lib.llama_sampler_sample(chain, self.ctx, index))

    def free_sampler(self, chain: Any) -> None:
        self.lib.llama_sampler_free(chain)

    def close(self) -> None:
        lib = self.lib
        if self.ctx:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
            self.ctx = self.model = None
