"""Server-sent events: the `text/event-stream` format, decoded as the HTML standard says.

Why our own: the maintained SSE client libraries are each tied to one HTTP client. httpx-sse
(the most used) imports httpx at import time, and the aiohttp ones are browser-style
`EventSource`s that reconnect when a stream ends (re-POSTing a chat completion) and strip every
leading space of a value instead of one. The decoding rules themselves are short and fixed; this
module follows them all (see tests/test_sse.py):

- lines end in CRLF, LF or CR, and a CRLF split across two network reads is one line end;
- a line starting with ':' is a comment (servers send them as keep-alives);
- `field: value` loses exactly one space after the colon; a line without a colon is a field
  with an empty value; unknown fields are ignored;
- several `data:` lines of one event are joined with LF;
- a blank line dispatches the event; an event with no data is not dispatched; an event cut
  off by the end of the stream (no blank line after it) is dropped;
- a UTF-8 byte order mark at the very start is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed it the body's bytes as they arrive; it returns the events each piece completes."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False
        self._pending_cr = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not self._started and chunk:
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF whose CR ended the previous read
        self._pending_cr = False
        buffer = self._buffer + chunk
        if b"\r" not in buffer:  # the common case: LF only
            *lines, self._buffer = buffer.split(b"\n")
        else:
            if buffer.endswith(b"\r"):
                self._pending_cr = True
                buffer += b"\n"  # ends the line now; a following LF is dropped above
            *lines, self._buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        events = [self._line(line.decode("utf-8", "replace")) for line in lines]
        return [event for event in events if event is not None]

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        retry, self._retry = self._retry, None
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self._id, retry)
