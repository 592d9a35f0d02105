"""The browser page for trying the model: a small Starlette app serving `service/static/`.

`service/service.py` mounts it with `@bentoml.asgi_app(ui_app, path="/ui")`. The page talks to the API with
relative URLs (`../predict`), so it keeps working behind a reverse proxy that adds a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .web import HeaderRewrite

STATIC_DIR = Path(__file__).parent / "static"

# The page loads nothing from other origins (no CDN, no fonts), so the policy can be strict: a stray external
# asset or an injected inline script is blocked by the browser instead of silently working. `data:` images
# are the 28x28 PNGs the API returns; `blob:` is the preview of a picked file.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# X-Content-Type-Options: nosniff is on every answer of the server already (http/patches.py, `configure`).
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
    # Revalidate every time (cheap: StaticFiles answers 304 on a matching ETag) so a redeploy is seen at once.
    (b"cache-control", b"no-cache"),
]


def with_security_headers(_status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`SECURITY_HEADERS` on every response of the page (replacing any of the same name)."""
    names = {name for name, _ in SECURITY_HEADERS}
    return [(k, v) for k, v in headers if k.lower() not in names] + SECURITY_HEADERS


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


# Explicit routes rather than one StaticFiles at "/": BentoML's PassiveMount only claims a request when one of
# the mounted app's own routes matches, so "/ui/" and "/ui/static/..." must each be a route here.
ui_app = Starlette(
    routes=[
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ],
    middleware=[Middleware(HeaderRewrite, rewrite=with_security_headers)],
)
