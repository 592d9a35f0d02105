"""The API routes answered without BentoML's per-API dispatch (issue 14; measured in docs/benchmarks.md).

For every request to an API method, BentoML 1.4 builds a request context, matches the path against each
of its routes and mounts, parses the body through the method's input spec, binds the call's signature,
runs output serialisation and attaches cleanup tasks to the response. For our endpoints all of that is
work without effect: they read the body themselves (uploads.py) and return ready JSON. `FastPath` is an
ASGI middleware (installed with `MNIST.add_asgi_middleware`) that sends `POST <api route>` straight to
the service's handler for it, `handle_<api name>(request)`, the same function the BentoML API method
calls. Everything outside it is untouched: BentoML's traffic metrics, tracing, access log, timeout and
error middleware still wrap these requests; health routes, /metrics, /docs.json, the page and any other
method or path go through BentoML as before. MNIST_FAST_PATH=0 turns it off (docs/api.md, "Settings").

BentoML's CORS middleware sits inside user middleware, so with MNIST_CORS_ORIGINS set the fast path
answers through the same Starlette CORS middleware, with the same options.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from bentoml import get_current_service  # once: `bentoml.<name>` is a lazy, per-access module lookup
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import requestid

log = logging.getLogger(__name__)

# What BentoML answers for an unexpected exception in an API method (its api_endpoint_wrapper).
INTERNAL_ERROR = {"error": "An unexpected error has occurred, please check the server log."}

Handler = Callable[[Request], Awaitable[Response]]


def handler_name(api_name: str) -> str:
    """The service method that does the work of API method `api_name`."""
    return f"handle_{api_name}"


class FastPath:
    """ASGI middleware: `POST` to a path in `routes` ({path: API method name}) goes to the current service
    instance's handler for it, and to a path that one of `patterns` matches whole, to that pattern's handler (the
    Open Inference Protocol's `infer`, whose path names the model); everything else to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, str],
        timeout_s: float,
        cors_origins: Sequence[str] = (),
        access_log: bool = False,
        patterns: Sequence[tuple[re.Pattern[str], Handler]] = (),
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.access_log = access_log
        self.routes = {path: handler_name(name) for path, name in routes.items()}
        self.patterns = tuple(patterns)
        self.dispatch: ASGIApp = self._dispatch
        if cors_origins:
            self.dispatch = CORSMiddleware(
                self._dispatch, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID"],
            )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._handler(scope["path"]) is not None:
            await self.dispatch(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _handler(self, path: str) -> str | Handler | None:
        """The service method's name (an API route) or the handler (a pattern's) for `path`; None: not ours."""
        name = self.routes.get(path)
        if name is None:
            return next((handle for pattern, handle in self.patterns if pattern.fullmatch(path)), None)
        return name

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request ID (requestid.py) is added here, to the response object, rather than by its middleware: the
        # API routes skip that extra ASGI layer and its wrapped `send`.
        start = time.perf_counter()
        rid, token = requestid.begin(scope)
        try:
            found = self._handler(scope["path"])
            handle: Handler = getattr(get_current_service(), found) if isinstance(found, str) else found
            try:
                response = await self._within_deadline(handle, Request(scope, receive, send))
            except Exception:  # a bug of ours: logged, answered as BentoML would, and the worker keeps serving
                log.exception("%s %s failed [request_id=%s]", scope["method"], scope["path"], rid)
                response = JSONResponse({**INTERNAL_ERROR, "request_id": rid}, status_code=500)
            response.raw_headers.append((requestid.HEADER, rid.encode("ascii")))
            await response(scope, receive, send)
        finally:
            requestid.end(token)
        if self.access_log or response.status_code >= 400:
            requestid.log_answer(scope, response.status_code, time.perf_counter() - start, rid)

    async def _within_deadline(self, handle: Handler, request: Request) -> Response:
        try:
            # Our own deadline, the same as BentoML's (which sits outside every user middleware, so its 504 would
            # carry no request ID): the work is cancelled, and stops at its next image (http/work.py).
            async with asyncio.timeout(self.timeout_s) as deadline:
                response = await handle(request)
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of the handler's own, not the deadline: a bug, answered 500 by _dispatch
            response = JSONResponse(
                {
                    "error": f"not able to process the request in {self.timeout_s:g} seconds (MNIST_REQUEST_TIMEOUT_S)",
                    "request_id": requestid.current(),
                },
                status_code=504,
            )
        return response


def api_routes(apis: Mapping[str, Any]) -> dict[str, str]:
    """{route: API method name} for a BentoML service's `apis`."""
    return {method.route: name for name, method in apis.items()}
