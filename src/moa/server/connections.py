"""Limits on connections, below the app: a header read timeout and a per-client cap.

uvicorn waits for a request's headers as long as the client likes: a client that opens a
connection and sends nothing, or one header byte at a time, holds it open for good, and a few
hundred of them exhaust the server's sockets. `limited_protocol` wraps uvicorn's HTTP protocol
(whichever it picked) so that

* the headers of each request must be complete within `header_timeout` seconds of the
  connection opening or the previous response ending (otherwise the connection is closed), and
* one client address holds at most `max_client_connections` connections at once (a further
  one gets a 429 in OpenAI's format and is closed); 0 turns the cap off, for a server behind
  a proxy that makes every client one address.

The body has its own deadline, `body_timeout`, enforced where it is read (`guards.read_body`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from moa.server.errors import RATE_LIMIT, ApiError, json_bytes

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_MAX_CLIENT_CONNECTIONS",
    "limited_protocol",
]

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Above what one well-behaved client opens (a batch with -j 64 against us, 200 test streams),
#: far below what exhausts a process's file descriptors.
DEFAULT_MAX_CLIENT_CONNECTIONS = 256


def _refusal(limit: int) -> bytes:
    error = ApiError(
        429,
        f"this client already holds {limit} connections to this server, its limit; reuse "
        "connections or close some, then retry",
        type=RATE_LIMIT,
        code="too_many_connections",
    )
    body = json_bytes(error.body())
    head = (
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


def limited_protocol(
    *, header_timeout: float, max_client_connections: int, base: type[Any] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`base`, default: the one uvicorn would pick) with the
    header timeout and the per-client cap. Each call makes a class with its own counts."""
    if header_timeout <= 0:
        raise ValueError("header_timeout must be positive")
    if max_client_connections < 0:
        raise ValueError("max_client_connections must be 0 (no cap) or more")
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    per_client: Counter[str] = Counter()

    class LimitedProtocol(base):  # type: ignore[misc, valid-type]
        _moa_peer: str | None = None
        _moa_timer: asyncio.TimerHandle | None = None
        _moa_waiting_since: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) and peer else None
            if host is not None and max_client_connections:
                if per_client[host] >= max_client_connections:
                    transport.write(_refusal(max_client_connections))
                    transport.close()
                    return
                per_client[host] += 1
                self._moa_peer = host
            self._moa_await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._moa_stop_timer()
            if self._moa_peer is not None:
                per_client[self._moa_peer] -= 1
                if per_client[self._moa_peer] <= 0:
                    del per_client[self._moa_peer]
                self._moa_peer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A new request cycle means its headers are complete: the body has its own deadline.
            if self._moa_timer is not None and self.cycle is not self._moa_waiting_since:
                self._moa_stop_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._moa_await_headers()

        def _moa_await_headers(self) -> None:
            self._moa_stop_timer()
            self._moa_waiting_since = self.cycle
            self._moa_timer = asyncio.get_running_loop().call_later(
                header_timeout, self._moa_headers_too_slow
            )

        def _moa_stop_timer(self) -> None:
            if self._moa_timer is not None:
                self._moa_timer.cancel()
                self._moa_timer = None

        def _moa_headers_too_slow(self) -> None:
            self._moa_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is self._moa_waiting_since and idle and not self.transport.is_closing():
                self.transport.close()

    LimitedProtocol.__name__ = LimitedProtocol.__qualname__ = f"Limited{base.__name__}"
    return LimitedProtocol
