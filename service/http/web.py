"""The API docs page at `/`, served without third-party requests, and redirects that ignore the Host header.

BentoML's own page at `/` loads Google Tag Manager from the internet (and tells Google about every visit);
this one is the same Swagger UI from BentoML's bundled files, with nothing else, under a strict
Content-Security-Policy. Starlette answers a path missing its trailing slash (`/ui`) with an absolute
redirect built from the Host header (`Host: evil.example` -> `http://evil.example/ui/`); `RelativeRedirects`
drops the scheme and host from such redirects, so the browser stays where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Swagger UI sets inline styles (style-src 'unsafe-inline'); scripts only from this server; the spec is
# fetched from ./docs.json (connect-src 'self'); its logo is an inline SVG (img-src data:).
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>MNIST digit recognition: API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def docs_page(_: Request) -> HTMLResponse:
    return HTMLResponse(
        DOCS_HTML,
        headers={"Content-Security-Policy": DOCS_CSP, "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"},
    )


# Mounted at "/" (service.py): BentoML's PassiveMounts are matched before its own index route.
routes = [Route("/", docs_page, methods=["GET", "HEAD"])]


class HeaderRewrite:
    """ASGI middleware: `rewrite(status, headers)` gives the headers each HTTP response starts with."""

    def __init__(self, app: ASGIApp, rewrite: Callable[[int, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]):
        self.app = app
        self.rewrite = rewrite

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_rewritten(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self.rewrite(message["status"], list(message.get("headers", [])))}
            await send(message)

        await self.app(scope, receive, send_rewritten)


def relative_redirects(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An absolute Location rewritten to its path (and query); other answers untouched."""
    return [_relative(k, v) for k, v in headers] if status in _REDIRECTS else headers


class RelativeRedirects(HeaderRewrite):
    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, relative_redirects)


def _relative(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    if name.lower() != b"location":
        return name, value
    url = urlsplit(value.decode("latin-1"))
    path = url.path or "/"
    return name, (path + (f"?{url.query}" if url.query else "")).encode("latin-1")
