"""An on-disk cache of upstream calls, so that rerunning a batch or an eval makes no calls.

    CachedProvider ─► hit:  the stored answer, no request
                   └► miss: the inner provider; a successful answer is stored

The key is a SHA-256 over a canonical JSON of everything that decides an answer: the endpoint
(base_url), model, messages, sampling parameters and the agent's sample index (so the n samples
of one model in Self-MoA stay distinct). Only successful, non-blank answers are stored: an error
or an empty answer is never replayed, so a failed row really is retried on the next run.

A cache must never be the reason a run fails: a corrupt database file is moved aside with a
logged warning and a fresh one started, and any other SQLite trouble (a locked file, a full
disk) turns into a miss or a skipped write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moa.env import Environment
from moa.providers.base import ChatRequest, Completion, Provider, ProviderWrapper, StreamChunk
from moa.providers.collect import StreamCollector
from moa.results import TokenLogprob, Usage

__all__ = [
    "CacheStats",
    "CachedProvider",
    "CallCache",
    "cache_key",
    "default_cache_path",
]

log = logging.getLogger("moa.cache")

#: Bumped when the stored layout changes; an older table is simply ignored.
_TABLE = "calls_v1"
#: Token log-probabilities of stored answers, for calls that asked for them (JSON per key).
_LOGPROBS_TABLE = "logprobs_v1"
#: How long a write waits for another process holding the database (two batches sharing one
#: cache). Short on purpose: the cache is an optimisation, and a skipped write costs one refetch.
_BUSY_TIMEOUT_MS = 2000
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def default_cache_path(env: Environment | None = None) -> Path:
    """`$XDG_CACHE_HOME/moa/calls.sqlite3`, else the platform's per-user cache directory."""
    env = env or Environment()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        base = Path(xdg)
    elif sys.platform == "win32" and env.get("LOCALAPPDATA"):
        base = Path(env.get("LOCALAPPDATA") or "")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path.home() / ".cache"
    return base / "moa" / "calls.sqlite3"


def _float(value: float | None) -> float | None:
    # 1 and 1.0 are the same temperature, but json.dumps writes them differently.
    return None if value is None else float(value)


def cache_key(base_url: str, request: ChatRequest) -> str:
    """The SHA-256 hex digest naming one upstream call."""
    canonical: dict[str, object] = {
        "base_url": base_url,
        "model": request.model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
        "temperature": _float(request.temperature),
        "max_tokens": request.max_tokens,
        "top_p": _float(request.top_p),
        "seed": request.seed,
        "sample": request.sample_index,  # the key's name predates the field's: caches stay valid
    }
    # Settings added later enter the key only when set, so keys stored before them still hit.
    for name in ("frequency_penalty", "presence_penalty", "repeat_penalty", "min_p"):
        value = getattr(request, name)
        if value is not None:
            canonical[name] = float(value)
    if request.stop:
        canonical["stop"] = list(request.stop)
    # logprobs is not in the key: asking for them does not change the answer, so a confidence
    # run reuses the candidates other strategies generated (and stores their log-probabilities).
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0


class CallCache:
    """A SQLite file of answers by key. Safe to share between providers, tasks and threads.

    Calls run directly on the caller's thread, even inside the event loop. That is deliberate:
    a lookup is one primary-key read and a write one small insert; in WAL mode with
    synchronous=NORMAL a commit does not fsync, so each takes tens of microseconds, less than
    the cost of a hop to a worker thread (asyncio.to_thread) and its pool contention under a
    64-row batch. The one slow case, another process holding the write lock, is capped by
    the short busy timeout and then skipped.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._open()

    # --- lifecycle ------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as error:
            if isinstance(error, sqlite3.Error) and _is_corruption(error):
                self._restart(error)
            else:
                self._give_up(error)  # a read-only or missing directory, a locked file, ...

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
                " key TEXT PRIMARY KEY,"
                " model TEXT NOT NULL,"
                " text TEXT NOT NULL,"
                " finish_reason TEXT,"
                " prompt_tokens INTEGER,"
                " completion_tokens INTEGER,"
                " created REAL NOT NULL)"
            )
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {_LOGPROBS_TABLE} (key TEXT PRIMARY KEY, data TEXT)"
            )
            # Reads the schema and a page: a file that is not a database fails here, at open.
            db.execute(f"SELECT count(*) FROM (SELECT 1 FROM {_TABLE} LIMIT 1)").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _restart(self, error: sqlite3.Error) -> None:
        """Move a damaged database (and its WAL files) aside, keeping it for inspection, and
        start a fresh one (or run without, if that fails too)."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.warning(
            "the call cache %s is corrupt (%s): moved it to %s and starting a fresh one; "
            "calls will be made again",
            self.path,
            error,
            aside.name,
        )
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                source.replace(aside.with_name(aside.name + suffix))
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as second:
            self._give_up(second)

    def _give_up(self, error: Exception) -> None:
        log.warning("the call cache %s cannot be used (%s): running without it", self.path, error)
        self._db = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading and writing --------------------------------------------------------------

    def get(self, key: str, *, logprobs: bool = False) -> Completion | None:
        """The stored answer, or None (a miss, or a cache that cannot be read right now). With
        `logprobs`, only an answer stored with its log-probabilities counts."""
        with self._lock:
            row = self._execute(
                f"SELECT text, finish_reason, prompt_tokens, completion_tokens, {_LOGPROBS_TABLE}"
                f".data FROM {_TABLE} LEFT JOIN {_LOGPROBS_TABLE} USING (key) WHERE key = ?",
                (key,),
            )
        if row is None:
            self.stats.misses += 1
            return None
        text, finish_reason, prompt_tokens, completion_tokens, stored_logprobs = row
        tokens = _decode_logprobs(stored_logprobs) if logprobs else None
        if not isinstance(text, str) or (logprobs and tokens is None):
            # A damaged row, or one without the log-probabilities asked for: refetch.
            self.stats.misses += 1
            return None
        usage = None
        if isinstance(prompt_tokens, int) and isinstance(completion_tokens, int):
            usage = Usage(prompt_tokens, completion_tokens)
        self.stats.hits += 1
        return Completion(
            text=text,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            usage=usage,
            logprobs=tokens,
        )

    def put(self, key: str, model: str, completion: Completion) -> None:
        """Store a successful answer. The first answer stored for a key stays: a key names one
        answer, so a rerun sees what the first run saw. The exception is an answer that comes
        with log-probabilities: it was fetched because the stored one had none, and replaces
        it, so that text and log-probabilities always belong together."""
        usage = completion.usage
        verb = "IGNORE" if completion.logprobs is None else "REPLACE"
        with self._lock:
            done = self._execute(
                f"INSERT OR {verb} INTO {_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    model,
                    completion.text,
                    completion.finish_reason,
                    None if usage is None else usage.prompt_tokens,
                    None if usage is None else usage.completion_tokens,
                    time.time(),
                ),
                write=True,
            )
            if done is not None and completion.logprobs is not None:
                self._execute(
                    f"INSERT OR REPLACE INTO {_LOGPROBS_TABLE} VALUES (?, ?)",
                    (key, _encode_logprobs(completion.logprobs)),
                    write=True,
                )
        if done is not None:
            self.stats.writes += 1

    def _execute(
        self, sql: str, params: Sequence[object], *, write: bool = False
    ) -> tuple[object, ...] | None:
        """Run one statement under the lock. Corruption restarts the cache; other errors are
        logged once per statement and treated as a miss or a skipped write."""
        if self._db is None:  # closed, or unusable from the start
            return None
        try:
            cursor = self._db.execute(sql, params)
            if write:
                return ()
            row: tuple[object, ...] | None = cursor.fetchone()
            return row
        except sqlite3.DatabaseError as error:
            if _is_corruption(error) and not self._closed:
                self._restart(error)
            else:
                log.warning(
                    "call cache %s: %s (continuing without it for this call)", self.path, error
                )
            return None


def _encode_logprobs(tokens: Sequence[TokenLogprob]) -> str:
    return json.dumps([[t.token, t.logprob, [list(a) for a in t.top]] for t in tokens])


def _decode_logprobs(data: object) -> tuple[TokenLogprob, ...] | None:
    if not isinstance(data, str):
        return None
    try:
        return tuple(
            TokenLogprob(str(token), float(logprob), tuple((str(a), float(b)) for a, b in top))
            for token, logprob, top in json.loads(data)
        )
    except (ValueError, TypeError):
        return None


def _is_corruption(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPTION_CODES
    message = str(error).lower()
    return "not a database" in message or "malformed" in message


class CachedProvider(ProviderWrapper):
    """A provider that answers from `cache` when it can, and fills it when it cannot.

    `base_url` identifies where answers come from (`ProviderConfig.endpoint()`). Closing it
    closes the inner provider only: the cache is shared by every provider of a run, and its
    owner closes it."""

    def __init__(self, inner: Provider, cache: CallCache, *, base_url: str) -> None:
        super().__init__(inner)
        self.cache = cache
        self.base_url = base_url

    def __repr__(self) -> str:
        return f"CachedProvider({self.inner!r}, base_url={self.base_url!r})"

    async def complete(self, request: ChatRequest) -> Completion:
        key = cache_key(self.base_url, request)
        stored = self.cache.get(key, logprobs=request.logprobs)
        if stored is not None:
            return stored
        completion = await self.inner.complete(request)
        if _worth_keeping(completion):
            self.cache.put(key, request.model, completion)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        key = cache_key(self.base_url, request)
        stored = self.cache.get(key, logprobs=request.logprobs)
        if stored is not None:
            yield StreamChunk(text=stored.text, logprobs=stored.logprobs)
            yield StreamChunk(finish_reason=stored.finish_reason or "stop", usage=stored.usage)
            return
        collected = StreamCollector()
        async with contextlib.aclosing(self.inner.stream(request)) as chunks:
            async for chunk in chunks:
                collected.add(chunk)
                yield chunk
        # Reached only when the stream ended normally (an error or an early close skips it):
        # a whole answer, safe to replay.
        completion = collected.completion()
        if completion.finish_reason is not None and _worth_keeping(completion):
            self.cache.put(key, request.model, completion)


def _worth_keeping(completion: Completion) -> bool:
    """A blank answer counts as a failure in the core ("empty"); replaying it from the cache
    would make that failure permanent, so it is never stored."""
    return bool(completion.text.strip())
