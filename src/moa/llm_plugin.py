"""The plugin for simonw's `llm` command: every MoA pipeline is one more model.

    llm -m moa/local "Why is the sky blue?"            any preset: moa/<preset>
    MOA_CONFIG=moa.yaml llm -m moa/fast "..."          each pipeline of that file: moa/<name>
    llm -m moa/local -o temperature 0.2 -o max_tokens 300 "..."   the aggregator's settings
    llm -c "and in winter?"                            conversations pass the history on

`llm` finds this module through the entry point in pyproject.toml. A file with one inline
pipeline gives `moa/moa`, as `moa serve` names it. A pipeline from MOA_CONFIG shadows a preset
of the same name. Usage (all calls of the run) goes into `llm logs`, and the response JSON
holds a per-agent summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, Callable, Iterator
from functools import partial
from typing import Any

import llm
from pydantic import Field

from moa.config import ConfigFile, load_config
from moa.engine import AnswerSettings, MoA
from moa.env import Environment
from moa.errors import ConfigError
from moa.presets import PRESETS, preset_config
from moa.providers.base import ChatMessage
from moa.results import Done, RunResult, TextDelta

__all__ = ["MoAAsyncModel", "MoAModel", "register_models"]

PREFIX = "moa/"


@llm.hookimpl
def register_models(register: Callable[..., None]) -> None:
    loaders: dict[str, Callable[[], ConfigFile]] = {n: partial(preset_config, n) for n in PRESETS}
    loaders.update(_config_loaders())
    for name, load in loaders.items():
        register(MoAModel(name, load), MoAAsyncModel(name, load))


def _config_loaders() -> dict[str, Callable[[], ConfigFile]]:
    path = Environment().get("MOA_CONFIG")
    if path is None:
        return {}
    try:
        config = load_config(path)
    except ConfigError as error:
        # Registration runs for every llm command: say what is wrong, keep llm usable.
        print(f"moa plugin: MOA_CONFIG: {error}", file=sys.stderr)
        return {}
    return {name: _named(config, name) for name in config.pipelines}


def _named(config: ConfigFile, name: str) -> Callable[[], ConfigFile]:
    return lambda: config.model_copy(update={"pipelines": {name: config.pipelines[name]}})


class _Options(llm.Model.Options):
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature of the aggregator."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens the aggregator may write."
    )


class _Shared:
    can_stream = True
    Options = _Options

    def __init__(self, name: str, load: Callable[[], ConfigFile]) -> None:
        self.model_id = PREFIX + name
        self._load = load

    def __str__(self) -> str:
        return f"MoA: {self.model_id}"

    async def _events(self, prompt: llm.Prompt, response: Any) -> AsyncGenerator[str, None]:
        """The answer's text as it comes; usage and the per-agent summary go on `response`."""
        messages = _messages(prompt)
        async with MoA.from_config(self._load()) as moa:
            moa = _answer_settings(moa, prompt.options)
            async with contextlib.aclosing(moa.stream(messages)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield event.text
                    elif isinstance(event, Done):
                        _record(response, event.result)


class MoAModel(_Shared, llm.Model):
    def execute(
        self, prompt: llm.Prompt, stream: bool, response: Any, conversation: Any
    ) -> Iterator[str]:
        runner = asyncio.Runner()
        events = self._events(prompt, response)

        async def step() -> str:
            return await anext(events)

        try:
            parts: list[str] = []
            while True:
                try:
                    text = runner.run(step())
                except StopAsyncIteration:
                    break
                if stream:
                    yield text
                else:
                    parts.append(text)
            if not stream:
                yield "".join(parts)
        finally:
            with contextlib.suppress(RuntimeError):
                runner.run(events.aclose())
            runner.close()


class MoAAsyncModel(_Shared, llm.AsyncModel):
    async def execute(
        self, prompt: llm.Prompt, stream: bool, response: Any, conversation: Any
    ) -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(self._events(prompt, response)) as events:
            if stream:
                async for text in events:
                    yield text
            else:
                yield "".join([text async for text in events])


def _messages(prompt: llm.Prompt) -> list[ChatMessage]:
    """The whole conversation as llm hands it over (earlier turns, then this prompt), as plain
    text messages; one system message, first, where the engine adds the references."""
    systems: list[str] = []
    messages: list[ChatMessage] = []
    for message in prompt.messages:
        text = "".join(p.text for p in message.parts if isinstance(p, llm.parts.TextPart))
        if message.role == "system":
            systems.append(text)
        elif message.role == "user":
            messages.append({"role": "user", "content": text})
        elif message.role == "assistant":
            messages.append({"role": "assistant", "content": text})
    if systems:
        messages.insert(0, {"role": "system", "content": systems[-1]})
    return messages


def _answer_settings(moa: MoA, options: Any) -> MoA:
    """The -o options apply to the agents that write the answer: the aggregator and the
    fallbacks standing in for it. Proposers keep their configured settings."""
    settings = AnswerSettings(
        temperature=getattr(options, "temperature", None),
        max_tokens=getattr(options, "max_tokens", None),
    )
    return moa.with_answer_settings(settings)


def _record(response: Any, result: RunResult) -> None:
    usage = result.usage
    response.set_usage(input=usage.prompt_tokens, output=usage.completion_tokens)
    response.response_json = {
        "agents": result.call_summaries(),
        "latency_s": round(result.latency_s, 3),
    }
