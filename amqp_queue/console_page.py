"""The operator console: a static page and its assets, shipped in the package.

The page holds no data and needs no token to load; everything it shows comes from the API,
called with the token the operator enters (sent as a bearer header, never a cookie, so there
is no CSRF surface). The Content-Security-Policy allows scripts and styles from this origin
only: even a payload that escaped ``textContent`` could not run.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "render.js": "text/javascript; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The console's files (in ``amqp_queue/console/``) and their media types."""

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, bytes]:
    folder = resources.files("amqp_queue") / "console"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def routes() -> list[Route]:
    """``/`` (the page) and ``/console/{asset}``; the files are read once, here."""
    files = _load()

    def answer(name: str) -> Response:
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    async def page(request: Request) -> Response:
        return answer("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name not in files:
            return JSONResponse(
                {"error": "not_found", "detail": f"no console asset {name!r}"}, status_code=404
            )
        return answer(name)

    return [Route("/", page, methods=["GET"]), Route("/console/{asset}", asset, methods=["GET"])]
