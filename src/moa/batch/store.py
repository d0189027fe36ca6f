"""The batch output: an append-only JSONL file that a run can be killed in and resumed from.

Durability: a row is finished only once its line is written and fsynced. Lines are appended
whole (O_APPEND, one write), so a `kill -9` can at worst leave the last line torn; on the next
open a torn last line is cut off (a complete one that only lacks its newline is kept), and the
rows it held simply run again. Appends are group-committed: rows finishing together share one
write and one fsync, which runs in a worker thread so the event loop keeps serving calls.

One record per row; a failed row's record is superseded by the record of a later attempt.
When the run ends, superseded failure records are dropped by rewriting the file atomically
(a temporary file, fsync, rename), so a finished output has each id exactly once.

A second `moa batch` writing the same file would duplicate rows, so the file is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa._files import write_atomically
from moa._text import replace_unencodable
from moa.batch.rows import id_key
from moa.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, documented limitation
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputStore", "StoredRecord"]

log = logging.getLogger("moa.batch")


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A parsed output line."""

    key: str
    ok: bool
    data: dict[str, Any]


def _parse_record(line: bytes) -> StoredRecord | None:
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "id" not in data or not isinstance(data.get("ok"), bool):
        return None
    row_id = data["id"]
    if isinstance(row_id, bool) or not isinstance(row_id, int | str):
        return None
    return StoredRecord(id_key(row_id), data["ok"], data)


class OutputStore:
    """The output file of one batch, opened for resuming. Use `OutputStore.open(path)`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        #: Ids whose row is done: skipped on resume, never written again.
        self.finished: set[str] = set()
        #: Ids with a record: a later one supersedes it, unless it is finished.
        self._seen: set[str] = set()
        self._superseded = 0
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    # --- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> OutputStore:
        """Open (or create) the output; any file-system refusal is one OutputError line."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _compact_leftover(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise OutputError(
                f"{path}: cannot use it as the output file ({_reason(error)}): choose another "
                "--output, or fix the directory"
            ) from None
        try:
            _lock(fd, path)
            store = cls(path, fd)
            store._recover()
        except OSError as error:
            os.close(fd)
            raise OutputError(f"{path}: cannot read the output file ({_reason(error)})") from None
        except BaseException:
            os.close(fd)
            raise
        return store

    def _recover(self) -> None:
        data = self.path.read_bytes()
        tail = data.rpartition(b"\n")[2]
        if tail and _parse_record(tail) is not None:
            os.write(self._fd, b"\n")  # whole, only the newline was lost: keep it
        elif tail:  # the last line has no newline: the run before was killed while writing it
            data = data[: len(data) - len(tail)]
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)
            log.warning(
                "%s: dropped a torn last line (%d bytes) left by an interrupted run; "
                "its row will run again",
                self.path,
                len(tail),
            )
        lines = _parse_lines(data)
        for _, record in lines:
            if record is not None:
                self._note(record)
        unreadable = sum(record is None for _, record in lines)
        if unreadable:
            log.warning(
                "%s: %d line(s) are not batch records; left as they are", self.path, unreadable
            )

    def _note(self, record: StoredRecord) -> None:
        if record.key in self._seen:
            self._superseded += 1  # an earlier line for this id no longer counts
        self._seen.add(record.key)
        if record.ok:
            self.finished.add(record.key)

    # --- appending --------------------------------------------------------------------------

    async def append(self, record: Mapping[str, Any]) -> None:
        """Write one row's record; returns once it is on disk."""
        # Anything unencodable left in a record (an upstream answer, say) must not stop the
        # batch: it is written as U+FFFD.
        record, _ = replace_unencodable(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        parsed = _parse_record(line)
        assert parsed is not None, "a batch record needs an id and ok"
        if parsed.key in self.finished:
            raise ValueError(f"row {parsed.key} is already finished in {self.path}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((line, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await done
        self._note(parsed)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            except OSError as error:
                failure = OutputError(
                    f"{self.path}: cannot write the output ({_reason(error)}); the rows saved "
                    "before are kept: fix that, then rerun the same command to resume"
                )
                for _, done in batch:
                    if not done.done():
                        done.set_exception(failure)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    # --- reading back and closing ----------------------------------------------------------

    def records(self) -> dict[str, dict[str, Any]]:
        """The record that counts for each id: its finished one, else its latest failure."""
        lines = _parse_lines(self.path.read_bytes())
        return {
            key: record.data
            for key, index in _authoritative(lines).items()
            if (record := lines[index][1]) is not None
        }

    async def aclose(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        try:
            if self._superseded:
                self._compact()
        except OSError as error:
            # The file is as it was: readers take each id's authoritative record, and the next
            # run compacts it. A failure here must not hide the run's own outcome.
            log.warning(
                "%s: could not drop %d superseded failure record(s) (%s); the file is intact "
                "and the next run will drop them",
                self.path,
                self._superseded,
                _reason(error),
            )
        finally:
            os.close(self._fd)

    def _compact(self) -> None:
        """Rewrite the file keeping one record per id (and any line that is not a record);
        atomic, so a kill during it leaves either the old file or the new one."""
        lines = _parse_lines(self.path.read_bytes())
        keep = set(_authoritative(lines).values())
        kept = [
            line + b"\n" for i, (line, record) in enumerate(lines) if record is None or i in keep
        ]
        write_atomically(self.path, b"".join(kept), temporary=_temporary(self.path))
        self._superseded = 0


def _parse_lines(data: bytes) -> list[tuple[bytes, StoredRecord | None]]:
    """Every non-blank line with its record (None for a line that is not one)."""
    return [(line, _parse_record(line)) for line in data.split(b"\n") if line.strip()]


def _authoritative(lines: list[tuple[bytes, StoredRecord | None]]) -> dict[str, int]:
    """For each id, the line that counts: its first finished record, else its last failure."""
    chosen: dict[str, int] = {}
    finished: set[str] = set()
    for index, (_, record) in enumerate(lines):
        if record is None or record.key in finished:
            continue
        chosen[record.key] = index
        if record.ok:
            finished.add(record.key)
    return chosen


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.compacting")


def _compact_leftover(path: Path) -> None:
    """A compaction killed before its rename leaves a temporary file: the real one is intact."""
    with contextlib.suppress(FileNotFoundError):
        _temporary(path).unlink()


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(
            f"{path}: another `moa batch` is writing this file; wait for it or use another --output"
        ) from None
