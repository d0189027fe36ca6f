"""The web page at `/`: static files from `moa/server/static`, under a strict CSP.

The page is plain HTML, CSS and JavaScript modules with no build step and no third-party code.
It talks to the same server over `/v1/models` and `POST /v1/moa/runs`, so it needs the same
key as any other client; the files themselves are public (they hold no data) and load without
one, which lets the page ask for the key.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moa.server.errors import ApiError

__all__ = ["CONTENT_SECURITY_POLICY", "ui_routes"]

#: Only our own scripts, styles and fetches; no inline code, no frames, no form posts, no
#: plug-ins. Model output is rendered as DOM text nodes (never as HTML), and this is the net
#: under that: an injected <script> or event handler attribute would not run.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always revalidated, so an upgraded server never runs a stale script.
    "Cache-Control": "no-cache",
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _load() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("moa.server") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return files


def ui_routes() -> list[Route]:
    """`GET /` and `GET /ui/<file>`, served from memory (the files are a few tens of KB)."""
    files = _load()

    def send(name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise ApiError(404, f"no file {name!r} in the web page's assets", code="not_found")
        body, media_type = found
        return Response(body, media_type=media_type, headers=_HEADERS)

    async def page(request: Request) -> Response:
        return send("index.html")

    async def asset(request: Request) -> Response:
        return send(request.path_params["name"])

    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/ui/{name}", asset, methods=["GET", "HEAD"]),
    ]
