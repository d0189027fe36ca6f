"""Set up the OpenTelemetry SDK from the standard OTEL_* variables, for `moa` commands.

The library itself only emits spans through the API (`moa.tracing`); an application that uses
it configures its own SDK. The CLI (and so `moa serve` and `moa mcp`) is an application, so it
does this here, when the [otel] extra is installed and the environment asks for traces:

    OTEL_TRACES_EXPORTER=console|otlp|none   (comma-separated; console writes to stderr)
    OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   (otlp, http/protobuf)
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES   (service.name defaults to "moa")
    OTEL_SDK_DISABLED=true                   turns it all off

Nothing is set up when none of the first two is set (so installing the extra never starts
exporting to a collector that does not exist), nor when a TracerProvider is already installed
(say by `opentelemetry-instrument`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from moa.errors import ConfigError, MissingExtraError

__all__ = ["configure_from_env"]

log = logging.getLogger("moa")

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Install a TracerProvider as OTEL_* asks; True if one was installed."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names and any(environ.get(e) for e in _ENDPOINTS):
        names = ["otlp"]
    names = [n for n in names if n != "none"]
    if not names:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        raise MissingExtraError(
            "OTEL_TRACES_EXPORTER (tracing)", "otel", "opentelemetry-sdk"
        ) from None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False  # the application (or opentelemetry-instrument) set one up already
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "moa"}))
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(_processor(name, environ))
    trace.set_tracer_provider(provider)
    return True


def _processor(name: str, environ: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    if name == "console":
        # stderr: stdout carries the answer, which scripts read.
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    if name != "otlp":
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use console, otlp or none"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: run  pip install "
                "opentelemetry-exporter-otlp-proto-grpc  (or use http/protobuf)"
            ) from None
    elif protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[no-redef,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            raise MissingExtraError(
                "the OTLP exporter", "otel", "opentelemetry-exporter-otlp-proto-http"
            ) from None
    else:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use http/protobuf or grpc"
        )
    return BatchSpanProcessor(OTLPSpanExporter())
