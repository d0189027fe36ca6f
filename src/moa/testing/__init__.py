"""Test helpers that ship with the package: a fake OpenAI-compatible server (needs [server])."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa.testing.fake_server import FakeOpenAIServer, RecordedRequest, Reply

__all__ = ["FakeOpenAIServer", "RecordedRequest", "Reply"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moa.testing import fake_server

        return getattr(fake_server, name)
    raise AttributeError(name)
