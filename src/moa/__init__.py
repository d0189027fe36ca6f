"""Mixture-of-Agents: several LLMs in layers, answering as one better model.

>>> from moa import MoA
>>> with MoA.from_preset("local") as moa:
...     print(moa.run("Why is the sky blue?").output)
"""

from moa._version import __version__
from moa.config import (
    Agent,
    ConfigFile,
    Layer,
    Pipeline,
    ProviderConfig,
    load_config,
    parse_config,
)
from moa.engine import AnswerSettings, MoA, PipelineProvider, open_pipelines
from moa.errors import (
    AggregatorFailed,
    BudgetExceeded,
    ConfigError,
    ContextLengthExceeded,
    InvalidRequest,
    LayerFailed,
    MalformedResponse,
    MissingExtraError,
    MoAError,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeout,
    RateLimited,
    RunError,
    StreamInterrupted,
)
from moa.presets import PRESETS
from moa.providers import (
    ChatRequest,
    Completion,
    Provider,
    StreamChunk,
    register_provider_type,
)
from moa.results import (
    AgentFinished,
    AgentResult,
    AgentStarted,
    AgentTextDelta,
    Aggregation,
    CandidateScore,
    Done,
    Event,
    LayerResult,
    RunResult,
    TextDelta,
    TokenLogprob,
    Usage,
)

__all__ = [
    "PRESETS",
    "Agent",
    "AgentFinished",
    "AgentResult",
    "AgentStarted",
    "AgentTextDelta",
    "Aggregation",
    "AggregatorFailed",
    "AnswerSettings",
    "BudgetExceeded",
    "CandidateScore",
    "ChatRequest",
    "Completion",
    "ConfigError",
    "ConfigFile",
    "ContextLengthExceeded",
    "Done",
    "Event",
    "InvalidRequest",
    "Layer",
    "LayerFailed",
    "LayerResult",
    "MalformedResponse",
    "MissingExtraError",
    "MoA",
    "MoAError",
    "Pipeline",
    "PipelineProvider",
    "Provider",
    "ProviderConfig",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderTimeout",
    "RateLimited",
    "RunError",
    "RunResult",
    "StreamChunk",
    "StreamInterrupted",
    "TextDelta",
    "TokenLogprob",
    "Usage",
    "__version__",
    "load_config",
    "open_pipelines",
    "parse_config",
    "register_provider_type",
]
