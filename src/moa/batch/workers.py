"""`moa batch --workers N`: rows in N worker processes on this machine, one writer.

The driver (the `moa batch` process) keeps the RowLedger and the Gatekeeper and listens on a
Unix socket in a private temporary directory; each worker process connects, builds the
pipeline (moa.batch.runner.RowWorker) and runs the rows the driver hands it, at most
`concurrency` at once. Messages are length-prefixed pickles of tuples:

    driver → worker   ("row", index)  ("lease", call, lease)  ("stop",)
    worker → driver   ("hello", pid)  ("done", RowDone)  ("admit", call, provider, tokens)
                      ("finish", lease, used, retry_after, limited)  ("fatal", message)

A worker that dies (its socket closes) has its rows re-queued and its leases released, and a
replacement is started while rows remain (up to N replacements in all). A worker whose driver
died sees its socket close and exits, so `kill -9` of the batch leaves no orphans working.
Processes are spawned, not forked: the driver runs an event loop and threads by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from moa.batch.distributed import Job, RowDone, RowLedger
from moa.batch.runner import RowWorker
from moa.batch.shared_limits import Gatekeeper, limited_providers, shared_limits
from moa.errors import ConfigError, MoAError, WorkersFailed

__all__ = ["run_with_workers"]

_HEADER = struct.Struct("!I")


def _sender(writer: asyncio.StreamWriter) -> Callable[[tuple[Any, ...]], Awaitable[None]]:
    """Sends messages on `writer`, one at a time (tasks of both sides send concurrently)."""
    lock = asyncio.Lock()

    async def send(message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with lock:
            writer.write(_HEADER.pack(len(data)) + data)
            await writer.drain()

    return send


async def _receive(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None once the other side has gone."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


# --- the driver -------------------------------------------------------------------------------


async def run_with_workers(job: Job, input_path: Path, ledger: RowLedger, *, workers: int) -> None:
    """Run every row waiting in `ledger` in `workers` processes."""
    gatekeeper = Gatekeeper(limited_providers(job.config.providers))
    directory = tempfile.mkdtemp(prefix="moa-batch-")  # mode 0700: only we can connect
    socket_path = os.path.join(directory, "driver.sock")
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    finished = asyncio.Event()
    fatal: list[str] = []
    replacements = [workers]
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def start_worker() -> None:
        process = context.Process(
            target=_worker_main,
            args=(job, str(input_path), socket_path),
            name=f"moa-batch-worker-{len(processes) + 1}",
            daemon=True,
        )
        process.start()
        processes.append(process)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        hello = await _receive(reader)
        worker = f"pid-{hello[1]}" if hello and hello[0] == "hello" else f"conn-{id(writer)}"
        calls: set[asyncio.Task[None]] = set()
        send = _sender(writer)

        async def hand_out() -> None:
            while len(ledger.held.get(worker, ())) < job.concurrency:
                index = ledger.take(worker)
                if index is None:
                    break
                await send(("row", index))

        async def admit(call: int, provider: str, tokens: int) -> None:
            lease = await gatekeeper.admit(worker, provider, tokens)
            try:
                await send(("lease", call, lease))
            except (ConnectionError, RuntimeError):
                gatekeeper.finish(lease, None)

        try:
            await hand_out()
            while (message := await _receive(reader)) is not None:
                kind = message[0]
                if kind == "admit":
                    admission = asyncio.create_task(admit(*message[1:]))
                    calls.add(admission)
                    admission.add_done_callback(calls.discard)
                elif kind == "finish":
                    gatekeeper.finish(*message[1:])
                elif kind == "done":
                    await ledger.done(worker, message[1])
                    await hand_out()
                elif kind == "fatal":
                    fatal.append(str(message[1]))
                    finished.set()
                    return
                if ledger.finished:
                    finished.set()
        except (ConnectionError, RuntimeError):
            pass  # the worker went away mid-message: handled below like any death
        finally:
            for admission in calls:
                admission.cancel()
            gatekeeper.release_worker(worker)
            connections.pop(task, None)
            if ledger.lost(worker) or not ledger.finished:
                await _replace_or_fail()
            with contextlib.suppress(Exception):
                writer.close()

    async def _replace_or_fail() -> None:
        if finished.is_set() or fatal:
            return
        if replacements[0] <= 0:
            fatal.append("worker processes kept dying")
            finished.set()
            return
        replacements[0] -= 1
        start_worker()

    async def watch() -> None:
        """Ends the run once every row is written, and notices workers that died before they
        connected (a crash at start-up), which no connection reports."""
        while not finished.is_set():
            await asyncio.sleep(0.5)
            if ledger.finished:
                finished.set()
            elif not connections and not any(p.is_alive() for p in processes):
                await _replace_or_fail()

    server = await asyncio.start_unix_server(serve, path=socket_path)
    try:
        for _ in range(workers):
            start_worker()
        watcher = asyncio.create_task(watch())
        await finished.wait()
        watcher.cancel()
        if fatal:
            raise (ConfigError if fatal[0].startswith("config:") else WorkersFailed)(
                fatal[0].removeprefix("config:").strip()
            )
    finally:
        server.close()
        # Workers stop when their socket closes; cancelling the connection tasks instead would
        # make asyncio's server log each cancellation as an error.
        for writer in list(connections.values()):
            writer.close()
        if connections:
            await asyncio.wait(list(connections), timeout=5)
        for process in processes:
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.terminate()
                await asyncio.to_thread(process.join, 5)
        shutil.rmtree(directory, ignore_errors=True)


# --- a worker process ---------------------------------------------------------------------------


def _worker_main(job: Job, input_path: str, socket_path: str) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(job, Path(input_path), socket_path))


async def _worker(job: Job, input_path: Path, socket_path: str) -> None:
    from moa.batch.rows import load_rows

    reader, writer = await asyncio.open_unix_connection(socket_path)
    send = _sender(writer)
    await send(("hello", os.getpid()))
    waiting: dict[int, asyncio.Future[int]] = {}
    calls = iter(range(1, 1 << 62))

    async def admit(provider: str, tokens: int) -> int:
        call = next(calls)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting[call] = future
        await send(("admit", call, provider, tokens))
        return await future

    def finish(
        lease: int, used: int | None, retry_after: float | None, limited: bool | None
    ) -> None:
        task = asyncio.ensure_future(send(("finish", lease, used, retry_after, limited)))
        pending.add(task)
        task.add_done_callback(pending.discard)

    pending: set[asyncio.Future[None]] = set()
    try:
        rows = load_rows(input_path)
        runner = RowWorker.for_job(job, shared_limits(admit, finish))
    except MoAError as error:
        await send(("fatal", f"config: {error}"))
        return
    running: set[asyncio.Task[None]] = set()

    async def run(index: int) -> None:
        done: RowDone = await runner.run(index, rows[index])
        await send(("done", done))

    try:
        while (message := await _receive(reader)) is not None:
            if message[0] == "row":
                task = asyncio.create_task(run(message[1]))
                running.add(task)
                task.add_done_callback(running.discard)
            elif message[0] == "lease":
                future = waiting.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif message[0] == "stop":
                break
    finally:
        # The driver has gone (or said stop): nothing this worker still runs can be saved.
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await runner.aclose()
        writer.close()
