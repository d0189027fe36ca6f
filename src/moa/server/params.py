"""Request parameters every endpoint shares, and where each one goes.

A parameter the client sets either changes the answer it gets or is refused with a 400 that
names it: silently dropping one would hand back something the client did not ask for. The
ones that shape the answer (temperature, top_p, the token cap, seed, ...) are applied to the
aggregator and its fallbacks, which write the answer the client sees; the proposers keep their
configured settings, since the client asks about the answer, not about the drafts behind it.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from moa.engine import AnswerSettings
from moa.server.errors import ApiError, unsupported

__all__ = [
    "AnswerSettings",
    "RunRequest",
    "SamplingRequest",
    "StreamOptions",
    "unsupported",
]


class RunRequest(Protocol):
    """What a run's response needs to know of its request, whichever endpoint took it."""

    @property
    def streamed(self) -> bool: ...

    @property
    def include_usage(self) -> bool: ...


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    include_usage: bool | None = None


class SamplingRequest(BaseModel):
    """The fields chat and legacy completions share. Unknown fields are accepted and have no
    effect (OpenAI adds fields often, and clients send them by default)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = None
    user: str | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.streamed and self.stream_options and self.stream_options.include_usage)

    @property
    def answer_tokens(self) -> int | None:
        return None

    def check_sampling(self) -> None:
        """Refuse what no MoA pipeline can honour, as OpenAI refuses what it cannot."""
        if self.stream_options is not None and not self.streamed:
            raise ApiError(
                400,
                "stream_options is only allowed with stream: true",
                param="stream_options",
                code="invalid_value",
            )
        if self.logit_bias:
            raise unsupported(
                "logit_bias",
                "logit_bias is not supported: token ids differ between the models of a pipeline",
            )
        if self.reasoning_effort is not None:
            raise unsupported(
                "reasoning_effort",
                "reasoning_effort is not supported by MoA pipelines; leave it unset",
            )

    def answer_settings(self) -> AnswerSettings:
        return AnswerSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.answer_tokens,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            user=self.user,
        )
