"""Request parameters every endpoint shares, and where each one goes.

A parameter the client sets either changes the answer it gets or is refused with a 400 that
names it: silently dropping one would hand back something the client did not ask for. The
ones that shape the answer (temperature, top_p, the token cap, seed, ...) are applied to the
aggregator and its fallbacks, which write the answer the client sees; the proposers keep their
configured settings, since the client asks about the answer, not about the drafts behind it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from moa.engine import AnswerSettings
from moa.providers.base import ChatMessage
from moa.server.errors import ApiError, unsupported

__all__ = ["ApiRequest", "SamplingRequest", "StreamOptions"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    include_usage: bool | None = None


class ApiRequest(BaseModel):
    """The fields every endpoint takes. Unknown fields are accepted and have no effect (OpenAI
    adds fields often, and clients send them by default)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    #: What the body should be, for the error about an empty one (each endpoint sets it).
    what: ClassVar[str]

    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    user: str | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.streamed and self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Refuse what no MoA pipeline can honour, as OpenAI refuses what it cannot."""
        if self.stream_options is not None and not self.streamed:
            raise ApiError(
                400,
                "stream_options is only allowed with stream: true",
                param="stream_options",
                code="invalid_value",
            )

    # Abstract (pydantic models are ABCs): each endpoint's request type is marked @final, so
    # that mypy flags one that forgets either method.
    @abstractmethod
    def to_messages(self) -> list[ChatMessage]:
        """The messages to answer, or a 400 naming the one at fault."""

    @abstractmethod
    def answer_settings(self) -> AnswerSettings:
        """The settings the client asks of the answer: see the module's docstring."""


class SamplingRequest(ApiRequest):
    """The fields chat and legacy completions share."""

    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = None
    # Refused unless left at their neutral value: see `check` and `check_stop`.
    n: int | None = None
    stop: str | list[str] | None = None

    @property
    def answer_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        super().check()
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
        if self.n not in (None, 1):
            raise unsupported("n", "a MoA pipeline writes one answer per request: send n=1")

    def check_stop(self) -> None:
        """Refuse stop sequences. Each endpoint calls it where it always has (right after `n`
        for chat, last for legacy completions), so that a request with several refused fields
        gets the 400 naming the same one as before."""
        if self.stop:
            raise unsupported("stop", "stop sequences are not supported by MoA pipelines")

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
