"""The chat page: static files shipped in the package (static/), served at / and /static/.

The page is a client of the public API only (/v1/models, /v1/chat/completions, /v1/qa). It needs
no key to load; it asks for one when the API answers 401. Its Content-Security-Policy allows
nothing but this origin, so text a model writes can never run as script.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


async def index(request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={
        "Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"})


def page_routes() -> list:
    return [Route("/", index, methods=["GET", "HEAD"]), Mount("/static", StaticFiles(directory=STATIC), name="static")]


def local_host(host: str) -> str:
    """The address a client on this machine connects to: a wildcard address becomes loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def page_url(host: str, port: int) -> str:
    host = local_host(host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"
