"""`moa serve`: MoA pipelines behind an OpenAI-compatible HTTP API (the [server] extra).

    from moa import open_pipelines, load_config
    from moa.server import create_app, serve

    serve(open_pipelines(load_config("moa.yaml")), port=8000)

Each pipeline is a model; any OpenAI client talks to it at http://host:port/v1.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from moa.errors import MissingExtraError

    raise MissingExtraError("moa serve", "server", error.name or "starlette") from None

from moa.server.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    ServerState,
    create_app,
)
from moa.server.runner import (
    DEFAULT_GRACE_PERIOD_S,
    BackgroundServer,
    check_exposure,
    is_loopback,
    serve,
)

__all__ = [
    "DEFAULT_GRACE_PERIOD_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONCURRENCY",
    "BackgroundServer",
    "ServerState",
    "check_exposure",
    "create_app",
    "is_loopback",
    "serve",
]
