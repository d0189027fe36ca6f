"""Typed results of a MoA run, and the events a streamed run yields.

Every agent call ends as an `AgentResult` with a status, never as a string such as
"Error: ...": only results whose status is usable are ever shown to a later layer.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = [
    "AgentFinished",
    "AgentResult",
    "AgentStarted",
    "AgentTextDelta",
    "Aggregation",
    "CandidateScore",
    "Done",
    "Event",
    "LayerResult",
    "RunResult",
    "TextDelta",
    "TokenLogprob",
    "Usage",
    "event_from_dict",
    "event_to_dict",
]

#: ok: a usable answer. truncated: usable, but cut by max_tokens. empty: the model said nothing.
#: failed: the call raised. cancelled: the layer moved on without it (deadline, enough answers).
AgentStatus = Literal["ok", "truncated", "empty", "failed", "cancelled"]
#: Why a call failed, for whoever decides whether to try again: `transient` (overload, outage,
#: timeout: a later try may succeed), `rejected` (the upstream refused the request itself, as
#: with a 400, 401 or 404: the same request would be refused again), `context_length` (the
#: prompt does not fit the model, even with the references cut).
FailureKind = Literal["transient", "rejected", "context_length"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token and its log-probability; `top` holds the most likely alternatives at
    that position (token, log-probability), when they were asked for."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class AgentResult:
    """What one agent produced in one layer (retries included)."""

    layer: int
    index: int
    provider: str
    model: str
    status: AgentStatus
    output: str = ""
    error: str | None = None
    latency_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    attempts: int = 1
    #: References cut to fit this agent's context window, if any.
    references_trimmed: bool = False
    #: Hedged calls: which request gave the answer when a second one was sent, else None.
    hedge: Literal["primary", "hedge"] | None = None
    #: Set when status is "failed".
    failure: FailureKind | None = None
    #: Token log-probabilities, when a strategy asked for them and the provider gave them
    #: (None: not asked, or none came back). Not in to_dict: the scores made of them are.
    logprobs: tuple[TokenLogprob, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """A usable answer that later layers may see."""
        return self.status in ("ok", "truncated")

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}#{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "output": self.output,
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "latency_s": round(self.latency_s, 4),
            "usage": self.usage.to_dict(),
            "attempts": self.attempts,
            **({"hedge": self.hedge} if self.hedge else {}),
        }


@dataclass(frozen=True, slots=True)
class LayerResult:
    """One proposer layer's agents, in order (their `layer` says which layer, from 1)."""

    agents: tuple[AgentResult, ...]
    latency_s: float

    @property
    def answers(self) -> list[str]:
        """The usable answers, in agent order: what the next layer is shown."""
        return [r.output for r in self.agents if r.ok]


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """How one last-layer answer fared under a selecting strategy (see moa.strategies)."""

    #: The agent's index in the last proposer layer.
    index: int
    #: vote: the normalised final answer it was counted under.
    answer: str | None = None
    #: confidence: mean token log-probability, the top-log-probability certainty, agreement with
    #: the other candidates (0–1), and the combined score the choice was made on.
    mean_logprob: float | None = None
    certainty: float | None = None
    agreement: float | None = None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index}
        for name in ("answer", "mean_logprob", "certainty", "agreement", "score"):
            value = getattr(self, name)
            if value is not None:
                data[name] = round(value, 6) if isinstance(value, float) else value
        return data


@dataclass(frozen=True, slots=True)
class Aggregation:
    """How the final answer was made: the aggregator's strategy and, when it chose among the
    last layer's answers, which one and why."""

    strategy: str = "synthesize"
    #: Index (in the last proposer layer) of the answer taken verbatim; None when synthesized.
    chosen: int | None = None
    #: vote (and select's fallback): candidates per normalised answer.
    counts: dict[str, int] | None = None
    scores: tuple[CandidateScore, ...] = ()
    #: synthesize with a window: the number of aggregator calls.
    steps: int | None = None
    #: Why the strategy did not run as configured (a fallback), in one line.
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "strategy": self.strategy,
            "chosen": self.chosen,
            "counts": None if self.counts is None else dict(self.counts),
            "scores": [s.to_dict() for s in self.scores] or None,
            "steps": self.steps,
            "note": self.note,
        }
        return {key: value for key, value in data.items() if value is not None}


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of one MoA run. `ok` is False only when the final answer broke midway."""

    output: str
    layers: tuple[LayerResult, ...]
    aggregator: AgentResult
    #: Every aggregator attempt in order: fallbacks tried before the one that answered.
    aggregator_attempts: tuple[AgentResult, ...]
    latency_s: float
    ttft_s: float | None
    ok: bool = True
    error: str | None = None
    aggregation: Aggregation = field(default_factory=Aggregation)

    @property
    def usage(self) -> Usage:
        return sum((call.usage for call in self.calls), Usage())

    @property
    def calls(self) -> list[AgentResult]:
        return [a for layer in self.layers for a in layer.agents] + list(self.aggregator_attempts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "ok": self.ok,
            "error": self.error,
            "layers": [[a.to_dict() for a in layer.agents] for layer in self.layers],
            "aggregator": self.aggregator.to_dict(),
            "usage": self.usage.to_dict(),
            "latency_s": round(self.latency_s, 4),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "aggregation": self.aggregation.to_dict(),
        }

    def call_summaries(self) -> list[dict[str, Any]]:
        """Each call in brief, as the llm plugin and the MCP tool report them beside the answer."""
        return [
            {
                "layer": c.layer,
                "model": f"{c.provider}/{c.model}",
                "status": c.status,
                "latency_s": round(c.latency_s, 3),
            }
            for c in self.calls
        ]


@dataclass(frozen=True, slots=True)
class AgentStarted:
    layer: int
    index: int
    provider: str
    model: str
    #: True for the final aggregation call (layer == number of proposer layers + 1).
    is_aggregator: bool = False


@dataclass(frozen=True, slots=True)
class AgentFinished:
    result: AgentResult
    is_aggregator: bool = False


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the final answer, as the aggregator streams it."""

    text: str


@dataclass(frozen=True, slots=True)
class AgentTextDelta:
    """A piece of one agent's answer as it streams: proposers and the aggregator alike.

    Sent only when asked for (`MoA.stream(..., agent_text=True)`). `layer` and `index` match
    the agent's AgentStarted; the aggregator's text also comes, once more, as TextDelta.
    """

    layer: int
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    result: RunResult


Event = AgentStarted | AgentFinished | AgentTextDelta | TextDelta | Done


# --- the JSON form of every event -------------------------------------------------------------
#
# One object per event with a "type" key; every field of the dataclasses is kept (floats are not
# rounded), so `event_from_dict(event_to_dict(e)) == e`. The server streams these forms
# (POST /v1/moa/runs); unknown keys are ignored when reading, so a stream may add its own
# (the server adds "t", seconds since the run started).


def _to_json(value: Any) -> Any:
    if isinstance(value, Usage):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if not dataclasses.is_dataclass(value):
        return value
    data = {
        f.name: _to_json(getattr(value, f.name))
        for f in dataclasses.fields(value)
        if f.name != "logprobs"  # scored by the strategies; the scores are in the result
    }
    if isinstance(value, AgentResult):
        data["ok"] = value.ok  # derived, for readers: ignored when read back
    if isinstance(value, RunResult):
        data["usage"] = value.usage.to_dict()  # derived too
    return data


def _from_json(kind: Any, value: Any) -> Any:
    """`value` (a JSON form) as the type `kind`, read from the dataclasses' annotations."""
    origin, args = get_origin(kind), get_args(kind)
    if value is None or kind is Any:
        return value
    if kind is Usage:
        return Usage(value.get("prompt_tokens", 0), value.get("completion_tokens", 0))
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        return kind(
            **{
                f.name: _from_json(hints[f.name], value[f.name])
                for f in dataclasses.fields(kind)
                if f.name in value  # absent: the field's default
            }
        )
    if origin is tuple:
        item = args[0] if args[-1] is Ellipsis else Any
        return tuple(_from_json(item, v) for v in value)
    if origin in (types.UnionType, Union):
        return _from_json(next(a for a in args if a is not type(None)), value)
    return value


def event_to_dict(event: Event) -> dict[str, Any]:
    """The JSON form of an event: a dict of JSON types with a "type" key."""
    kind = next((name for name, cls in EVENT_TYPES.items() if type(event) is cls), None)
    if kind is None:
        raise TypeError(f"not a MoA event: {event!r}")
    return {"type": kind, **_to_json(event)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """The event a JSON form describes. Raises ValueError for an unknown "type"."""
    kind = data.get("type")
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown MoA event type {kind!r}; known: {', '.join(EVENT_TYPES)}")
    event: Event = _from_json(EVENT_TYPES[kind], data)
    return event


#: The "type" of each event's JSON form.
EVENT_TYPES: dict[str, type] = {
    "agent_started": AgentStarted,
    "agent_finished": AgentFinished,
    "agent_text_delta": AgentTextDelta,
    "text_delta": TextDelta,
    "done": Done,
}
