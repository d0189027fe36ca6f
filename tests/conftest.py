"""Shared fixtures: one fake OpenAI-compatible server for the session, reset for every test, and
pipelines on an in-process scripted provider."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest

from moa import MoA, parse_config
from moa.config import ConfigFile
from moa.providers.base import Provider
from moa.testing import FakeOpenAIServer


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """The fake server with no scripts and an empty request log."""
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must never reach a real provider with a real key."""
    for name in ("OPENAI_API_KEY", "TOGETHER_API_KEY", "GROQ_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


ConfigMaker = Callable[..., ConfigFile]
MoAMaker = Callable[..., MoA]


@pytest.fixture
def make_config(fake: FakeOpenAIServer) -> ConfigMaker:
    """A config whose single provider `fake` points at the fake server."""

    def make(**pipeline: Any) -> ConfigFile:
        data: dict[str, Any] = {"providers": {"fake": {"base_url": fake.base_url}}}
        data.update(pipeline)
        return parse_config(data)

    return make


@pytest.fixture
def make_moa(make_config: ConfigMaker) -> Iterator[MoAMaker]:
    opened: list[MoA] = []

    def make(**pipeline: Any) -> MoA:
        moa = MoA.from_config(make_config(**pipeline))
        opened.append(moa)
        return moa

    yield make
    for moa in opened:
        moa.close()


def agents(*models: str, **settings: Any) -> list[dict[str, Any]]:
    return [{"model": m, **settings} for m in models]


def scripted_moa(providers: dict[str, Provider], **pipeline: Any) -> MoA:
    """A pipeline over in-process providers (`moa.testing.ScriptedProvider`): no HTTP. Agents
    use the first provider unless they name one."""
    declared = {name: {"base_url": "http://127.0.0.1:9/v1"} for name in providers}  # unused
    config = parse_config({"providers": declared, **pipeline})
    return MoA(config.resolve(), providers)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
_to_close: list[_Closable] = []


def closed_after_test(resource: C) -> C:
    """Close `resource` (an HTTP client, say) when the test ends: left to the garbage collector,
    its sockets are a leak, which fails some later test with a ResourceWarning."""
    _to_close.append(resource)
    return resource


@pytest.fixture(autouse=True)
def _close_what_the_test_opened() -> Iterator[None]:
    yield
    while _to_close:
        _to_close.pop().close()
