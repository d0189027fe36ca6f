"""Cross-origin access for browser chat UIs served from another origin (`--cors-origin`).

Nothing is allowed by default. Clients authenticate with an `Authorization: Bearer` header,
which a page sets itself, so browsers never need to send cookies: credentials mode stays off,
and that is also what makes `*` safe to allow. Preflight requests are answered before the key
check (browsers send them without the header); refusals carry the CORS headers too, so a page
can read our 401 or 429 instead of an opaque network error.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from moa.errors import ConfigError

__all__ = ["check_origin", "cors_middleware"]

#: Headers a page may read from our responses, beyond the CORS-safelisted ones.
_EXPOSED = ["x-request-id", "retry-after", "x-should-retry"]


def check_origin(origin: str) -> str:
    """`*`, or an origin as browsers send it: scheme://host[:port], without a path."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(
            f"--cors-origin {origin!r}: give an origin such as https://chat.example.com or "
            "http://localhost:3000 (scheme, host and port only), or '*' for any"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"--cors-origin {origin!r}: an origin has no query or fragment")
    return f"{parts.scheme}://{parts.netloc}".lower()


def cors_middleware(origins: Iterable[str]) -> list[Middleware]:
    allowed = [check_origin(o) for o in origins]
    if not allowed:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=allowed,
            allow_methods=["GET", "POST"],
            # The OpenAI JS SDK adds its own x-stainless-* headers: allow whatever is asked.
            allow_headers=["*"],
            allow_credentials=False,
            expose_headers=_EXPOSED,
            max_age=600,
        )
    ]
