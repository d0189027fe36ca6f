"""Serving the app with uvicorn: the exposure check, log redaction and graceful draining.

On SIGTERM (or Ctrl-C) the server starts draining: it keeps listening while runs are in
flight, for up to `grace_period` seconds, answering 503 to new requests and "draining" on
/healthz (so a load balancer sees why, instead of a refused connection); once the runs are done
or the grace period is over it stops listening, cancels what is left (which cancels its
upstream calls) and closes the providers.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from moa.engine import MoA
from moa.env import RedactingFilter
from moa.errors import ConfigError
from moa.server.app import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    create_app,
    server_state,
)
from moa.server.connections import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CLIENT_CONNECTIONS,
    limited_protocol,
)

__all__ = [
    "DEFAULT_GRACE_PERIOD_S",
    "BackgroundServer",
    "MoAServer",
    "check_exposure",
    "is_loopback",
    "redact_server_logs",
    "serve",
]

DEFAULT_GRACE_PERIOD_S = 30.0

_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "moa")


def is_loopback(host: str) -> bool:
    """Only this machine can reach the address. Unknown host names count as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: Iterable[str], allow_unauthenticated: bool) -> None:
    """Refuse to open the pipelines (and the keys behind them) to a network without a key."""
    if is_loopback(host) or any(True for _ in keys) or allow_unauthenticated:
        return
    raise ConfigError(
        f"refusing to serve on {host} without authentication: anyone who can reach it could "
        "spend your upstream keys. Set MOA_API_KEYS (comma-separated keys that clients send as "
        "'Authorization: Bearer <key>'), or pass --allow-unauthenticated if something in front "
        "of this server checks clients"
    )


def redact_server_logs() -> None:
    """Every handler that prints our or uvicorn's records drops registered secrets first.

    uvicorn's access log prints request paths, query strings included: a client that puts a
    key in the URL must not get it written to the log.
    """
    root = logging.getLogger()
    if not root.handlers:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(stderr)
    for logger in (root, *(logging.getLogger(name) for name in _LOGGERS)):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
    if logging.getLogger("moa").getEffectiveLevel() > logging.INFO:
        logging.getLogger("moa.server").setLevel(logging.INFO)


class MoAServer(uvicorn.Server):
    """uvicorn's server, draining the app as soon as the shutdown signal arrives."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: Starlette,
        on_started: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.on_started = on_started

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.begin_draining()
        super().handle_exit(sig, frame)

    def begin_draining(self) -> None:
        server_state(self.app).draining = True

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        """Keep listening (answering 503) while runs are in flight, up to the grace period;
        then let uvicorn close the listener and wait out what is left of the period."""
        self.begin_draining()
        grace = float(self.config.timeout_graceful_shutdown or 0)
        deadline = time.monotonic() + grace
        slots = server_state(self.app).slots
        # Polled: the slots have no hook to wake us, and 50 ms is nothing beside a drain.
        while slots.in_use and time.monotonic() < deadline and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        left = max(deadline - time.monotonic(), 0.001)
        self.config.timeout_graceful_shutdown = left  # type: ignore[assignment]
        await super().shutdown(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)  # type: ignore[arg-type]
        if self.started and self.on_started is not None:
            self.on_started(self.url)

    @property
    def url(self) -> str:
        """http://host:port of the listening socket (the real port when 0 was asked for)."""
        return socket_url(self.servers[0].sockets[0])


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_server(
    app: Starlette,
    *,
    host: str,
    port: int,
    grace_period: float = DEFAULT_GRACE_PERIOD_S,
    log_level: str = "info",
    on_started: Callable[[str], None] | None = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    max_client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS,
) -> MoAServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        # Our handlers (with redaction) print uvicorn's records: it installs none of its own.
        log_config=None,
        log_level=log_level,
        # Typed as int by uvicorn, but it is only ever a timeout: fractions work (tests use them).
        timeout_graceful_shutdown=max(grace_period, 0.001),  # type: ignore[arg-type]
        server_header=False,
        http=limited_protocol(
            header_timeout=header_timeout, max_client_connections=max_client_connections
        ),
    )
    return MoAServer(config, app, on_started)


def serve(
    pipelines: Mapping[str, MoA],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Iterable[str] = (),
    allow_unauthenticated: bool = False,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    grace_period: float = DEFAULT_GRACE_PERIOD_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    on_started: Callable[[str], None] | None = None,
    ui: bool = True,
    metrics: bool = False,
    metrics_public: bool = False,
    cors_origins: Iterable[str] = (),
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    max_client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT, in the foreground. Takes ownership of the pipelines.

    `sockets`: listen on these already bound sockets (the workers of `moa serve --workers`)."""
    keys = tuple(api_keys)
    check_exposure(host, keys, allow_unauthenticated)
    app = create_app(
        pipelines,
        api_keys=keys,
        max_body_bytes=max_body_bytes,
        max_concurrency=max_concurrency,
        heartbeat_s=heartbeat_s,
        ui=ui,
        metrics=metrics,
        metrics_public=metrics_public,
        cors_origins=cors_origins,
        body_timeout=body_timeout,
    )
    redact_server_logs()
    server = build_server(
        app,
        host=host,
        port=port,
        grace_period=grace_period,
        on_started=on_started,
        header_timeout=header_timeout,
        max_client_connections=max_client_connections,
    )
    # Everything loaded so far (modules, pipelines, SDK types) lives as long as the server:
    # kept out of the collector's reach, full collections stay short and do not stall streams.
    gc.freeze()
    try:
        server.run(sockets=sockets)
    except SystemExit as stopped:
        if server.started:
            raise
        # uvicorn logged why (a port in use, say) and exits with a code of its own.
        raise ConfigError(
            f"could not serve on {host}:{port} (see the log line above); is another server "
            "using the port?"
        ) from stopped


class BackgroundServer:
    """The app served by uvicorn in a thread of this process (tests, notebooks, embedding).

    with BackgroundServer(create_app(pipelines)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="...")
    """

    def __init__(
        self,
        app: Starlette,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        grace_period: float = 5.0,
        log_level: str = "warning",
        header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
        max_client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS,
    ) -> None:
        self.server = build_server(
            app,
            host=host,
            port=port,
            grace_period=grace_period,
            log_level=log_level,
            header_timeout=header_timeout,
            max_client_connections=max_client_connections,
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self.server.run, name="moa-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MoA server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Shut down as on SIGTERM: drain, wait for runs up to the grace period, close."""
        self.server.begin_draining()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
