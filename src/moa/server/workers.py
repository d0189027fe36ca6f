"""`moa serve --workers N`: N server processes sharing one listening socket.

One Python process serves on one core; the upstream HTTP client, JSON and the engine are all
CPU work under load. The parent binds the port once and forks N workers that each run the
whole server (app, pipelines, providers) on that same socket: the kernel hands each new
connection to whichever worker accepts it first. The parent then only waits, passing SIGTERM /
SIGINT on to the workers (each drains as a single server does) and exiting with the worst
exit code among them.

Limits are per worker: `--max-concurrency` and each provider's `max_concurrency` / `rpm` /
`tpm` hold in each process, so the whole server allows N times as much. Set them to the share
of one worker (the README says so).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from moa.engine import MoA
from moa.errors import ConfigError
from moa.server.runner import serve, socket_url

__all__ = ["serve_workers"]


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker shares (uvicorn's own backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as error:
        raise ConfigError(
            f"could not serve on {host}:{port}: {error.strerror or error}; is another server "
            "using the port?"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve_workers(
    pipelines: Mapping[str, MoA],
    *,
    workers: int,
    host: str,
    port: int,
    on_started: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Serve `pipelines` from `workers` forked processes until SIGTERM / SIGINT."""
    sock = bind(host, port)
    url = socket_url(sock)

    def run_worker() -> None:
        # A fresh process image from fork: the providers have opened nothing yet (sessions
        # are made per event loop, on the first call), so nothing is shared by accident.
        serve(pipelines, host=host, port=sock.getsockname()[1], sockets=[sock], **options)

    # fork, not spawn: the pipelines (and any key read from a .env file) carry over as they are.
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=run_worker, name=f"moa-serve-{n}") for n in range(1, workers + 1)
    ]
    for process in processes:
        process.start()
    sock.close()  # the workers hold it now

    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_started is not None:
            on_started(url)
        for process in processes:
            process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A worker stopped by the signal we passed on ends as uvicorn ends: by that signal.
    stopped = {0, *(-signum for signum in received)}
    codes = [process.exitcode or 0 for process in processes]
    if any(code not in stopped for code in codes):
        raise SystemExit(max(abs(code) for code in codes))
    if received:  # exit as a single server would: by the signal, once the workers are done
        signal.raise_signal(received[0])
