"""Test helpers that ship with the package: a fake OpenAI-compatible server on loopback (needs
[server]), a provider scripted in-process, and an event loop on virtual time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moa.testing.clock import VirtualClockLoop, run_virtual
from moa.testing.scripted import Answer, ScriptedCall, ScriptedProvider

if TYPE_CHECKING:
    from moa.testing.fake_server import FakeOpenAIServer, RecordedRequest, Reply

__all__ = [
    "Answer",
    "FakeOpenAIServer",
    "RecordedRequest",
    "Reply",
    "ScriptedCall",
    "ScriptedProvider",
    "VirtualClockLoop",
    "run_virtual",
]

_SERVER = ("FakeOpenAIServer", "RecordedRequest", "Reply")


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        from moa.testing import fake_server

        return getattr(fake_server, name)
    raise AttributeError(name)
