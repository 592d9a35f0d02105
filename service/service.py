"""The BentoML service: uploaded digits in, probabilities out (API described in docs/api.md).

Thin on purpose; it wires three layers, whose imports point down only:
- `imaging/`: bytes -> 28x28 pixels (decode, light, lines, glyphs, cuts); pure Pillow and numpy, no HTTP, no model;
- `inference/`: ONNX Runtime sessions and model cards, a request's images through a model, metrics;
- `http/`: request bodies within limits, bounded work, the fast path, request IDs, the page, and (patches.py)
  every patch of a server internal, applied only here in a serving worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import ClientError
from .http import admin, patches, requestid, siblings, v2, web
from .http.fastpath import FastPath, api_routes
from .http.patches import JSONAnswer, MultipartRequest, RawRequest
from .http.requestid import RequestIds
from .http.ui import ui_app
from .http.uploads import read_images, read_json
from .http.work import Offloader, request_pixels
from .inference.answers import classify, classify_pixels, is_small, read_number
from .inference.repository import Repository, fixed_registry
from .inference.runtime import ModelError, Registry
from .settings import Settings

log = logging.getLogger(__name__)

SETTINGS = Settings.from_env()
# BentoML's worker sets its index before it imports this module; `bentoml serve` itself, `bentoml build` and the
# tests import it without one, and get no patch (http/patches.py says why it must be here, at import).
if bentoml.server_context.worker_index is not None:
    # BentoML's server logging shows its own loggers' INFO lines and only warnings of others: ours at INFO too
    # (start-up lines, client errors with their request ID, the access log).
    logging.getLogger(__package__).setLevel(logging.INFO)
    patches.install(SETTINGS, bentoml.server_context.worker_index)
# BentoML's CORS middleware, only for the origins named (off by default).
CORS = {
    "cors": {
        "enabled": True,
        "access_control_allow_origins": list(SETTINGS.cors_origins),
        "access_control_allow_methods": ["GET", "POST"],
        "access_control_allow_headers": ["Content-Type", "X-Request-ID"],
        "access_control_expose_headers": ["X-Request-ID"],
    }
}


async def model_cards(_: Request) -> JSONResponse:
    """The default model, each model's default version's card, and every version each model serves."""
    registry: Registry = bentoml.get_current_service().registry
    versions = {name: registry.versions(name) for name in registry.names()}
    return JSONResponse({"default": registry.default, "models": registry.cards(), "versions": versions})


# BentoML APIs answer POST only; GET /model is a one-route app, matched only for that path.
# The management routes of the model repository exist only with MNIST_ADMIN_TOKEN set (http/admin.py). Their answers
# wait for every worker, at most half the request timeout, so that the answer beats BentoML's timeout.
ADMIN_ROUTES = admin.routes(SETTINGS.admin_token, SETTINGS.body_timeout_s, SETTINGS.request_timeout_s / 2)
# The Open Inference Protocol (KServe V2) under /v2 (http/v2.py).
OPEN_INFERENCE = v2.OpenInference(SETTINGS)
model_app = Starlette(
    routes=[Route("/model", model_cards, methods=["GET"]), *web.routes, *ADMIN_ROUTES, *OPEN_INFERENCE.routes]
)


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(model_app, path="/")
# BentoML keeps every request's state alive until its timeout timer fires, even after the answer is sent:
# at ~1,000 requests/s a 30 s timeout holds ~30,000 requests' objects and makes each full garbage
# collection take 200+ ms (measured, docs/benchmarks.md). Our slowest legitimate request is far below 10 s.
# The API routes have our own deadline of MNIST_REQUEST_TIMEOUT_S (fastpath.py); BentoML's, a second later, is
# the backstop for the rest.
@bentoml.service(
    name="mnist",
    workers=SETTINGS.workers,
    threads=SETTINGS.threads,
    traffic={"timeout": SETTINGS.request_timeout_s + 1},
    # Our access log (requestid.py, MNIST_ACCESS_LOG=1) carries the request ID; BentoML's would be a second line.
    logging={"access": {"enabled": False}},
    **({"http": CORS} if SETTINGS.cors_origins else {}),
)
class MNIST:
    def __init__(self) -> None:
        # With management on (MNIST_ADMIN_TOKEN), a serving worker follows the model repository, whose versions change
        # live; without it, the shipped models are fixed, each through the gate (inference/repository.py). A script
        # or test that makes the class itself gets MNIST_MODELS' files as they are.
        self.repository: Repository | None = None
        try:
            if bentoml.server_context.worker_index is None:
                self.registry = Registry.load(SETTINGS)
            elif not SETTINGS.admin_token:
                self.registry = fixed_registry(SETTINGS)
            else:
                self.repository = Repository(SETTINGS, bentoml.server_context.worker_index)
                self.repository.start()
                self.registry = self.repository.registry
        except ModelError as exc:
            stop_the_server(exc)
            raise
        self._following: asyncio.Task | None = None
        self.work: Offloader | None = None
        tune_garbage_collector()
        # BentoML makes the instance in the worker's lifespan, inside its event loop; a script or test has none.
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            patches.report(loop)
            if self.repository is not None:
                self._following = loop.create_task(self.repository.follow())
            # In a container, a dead sibling worker stops the server, which the orchestrator restarts (siblings.py).
            self._siblings = siblings.start(loop, SETTINGS.workers, bentoml.server_context.worker_index)
        if bentoml.server_context.worker_index is not None:
            # One line per worker once its models are served: how an operator (and the tests) see every worker up,
            # where /readyz answers from whichever worker is up first.
            served = "; ".join(f"{name} {self.registry.default_version(name)}" for name in self.registry.names())
            log.info("worker %d ready: %s", bentoml.server_context.worker_index, served)

    # The API methods, as BentoML sees them (OpenAPI, routes, clients). Each one's work is in its handler,
    # `handle_<name>(request)`, which FastPath (fastpath.py) calls directly for requests over HTTP; the
    # method itself runs when MNIST_FAST_PATH=0.

    @bentoml.api(route="/predict", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def predict(self, ctx: bentoml.Context) -> JSONResponse:
        """One image: multipart file field `image` (fields model, version, return_image), or a raw image/* body."""
        return answered(ctx, await self.handle_predict(ctx.request))

    @bentoml.api(route="/predict_batch", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def predict_batch(self, ctx: bentoml.Context) -> JSONResponse:
        """Up to MNIST_MAX_BATCH images in repeated file field `images`; answers in request order."""
        return answered(ctx, await self.handle_predict_batch(ctx.request))

    @bentoml.api(route="/read", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def read(self, ctx: bentoml.Context) -> JSONResponse:
        """A number: every digit on one image (multipart field `image`, or a raw image/* body), left to right."""
        return answered(ctx, await self.handle_read(ctx.request))

    @bentoml.api(route="/predict_pixels", input_spec=RawRequest, output_spec=JSONAnswer)
    async def predict_pixels(self, ctx: bentoml.Context) -> JSONResponse:
        """JSON `{"pixels": 28 rows of 28 numbers in [0, 1], white on black, "model": optional}`."""
        return answered(ctx, await self.handle_predict_pixels(ctx.request))

    @bentoml.api(route="/ping", input_spec=RawRequest, output_spec=JSONAnswer)
    async def ping(self, ctx: bentoml.Context) -> JSONResponse:
        """Does nothing: the cost of the HTTP stack alone, the floor for benchmarks."""
        return answered(ctx, await self.handle_ping(ctx.request))

    async def handle_predict(self, request: Request) -> JSONResponse:
        try:
            upload = await read_images(
                request, field="image", max_files=1, max_bytes=SETTINGS.max_bytes,
                too_many="send one image per request to /predict, or several to /predict_batch",
                timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"), upload.fields.get("version"))
            args = (model, upload.files, upload.flag("return_image"), SETTINGS)
            # A digit-sized image (the usual upload) costs ~0.2 ms: less than handing it to a thread.
            if is_small(upload.files[0][1]):
                answers = classify(*args)
            else:
                pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
                answers = await self._offload(classify, *args, pixels=pixels, request=request)
            return JSONResponse(answers[0])
        except ClientError as exc:
            return rejection(exc)

    async def handle_predict_batch(self, request: Request) -> JSONResponse:
        try:
            upload = await read_images(
                request, field="images", max_files=SETTINGS.max_batch, max_bytes=SETTINGS.max_bytes,
                too_many=f"too many images: the limit is {SETTINGS.max_batch} per request (MNIST_MAX_BATCH)",
                allow_raw=False, timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"), upload.fields.get("version"))
            pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
            answers = await self._offload(
                classify, model, upload.files, upload.flag("return_image"), SETTINGS, pixels=pixels, request=request
            )
            return JSONResponse({"predictions": answers, "model": model.card.name, "version": model.card.version})
        except ClientError as exc:
            return rejection(exc)

    async def handle_read(self, request: Request) -> JSONResponse:
        try:
            upload = await read_images(
                request, field="image", max_files=1, max_bytes=SETTINGS.max_bytes,
                too_many="send one image per request to /read", timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"), upload.fields.get("version"))
            pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
            data = upload.files[0][1]
            return JSONResponse(await self._offload(read_number, model, data, SETTINGS, pixels=pixels, request=request))
        except ClientError as exc:
            return rejection(exc)

    async def handle_predict_pixels(self, request: Request) -> JSONResponse:
        try:
            body = await read_json(request, max_bytes=SETTINGS.max_bytes, timeout_s=SETTINGS.body_timeout_s)
            model = self.registry.get(body.get("model"), body.get("version"))
            return JSONResponse(await self._offload(classify_pixels, model, body))
        except ClientError as exc:
            return rejection(exc)

    async def handle_ping(self, request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def _offload(self, func: Any, *args: Any, pixels: int = 0, request: Request | None = None) -> Any:
        # Decoding and inference block: run them in threads, at most MNIST_THREADS at a time per worker,
        # so the event loop keeps accepting requests; `pixels` (from the images' headers) are held from the
        # worker's MNIST_MAX_INFLIGHT_PIXELS while they decode; work stops when `request`'s client is gone
        # (see http/work.py). Created inside the loop, which the budget belongs to.
        if self.work is None:
            self.work = Offloader(SETTINGS.threads, SETTINGS.max_inflight_pixels)
        return await self.work.run(func, *args, pixels=pixels, request=request)


def stop_the_server(exc: ModelError) -> None:
    """A model that cannot be served (no file, metadata missing, MNIST_DEVICE=cuda without CUDA) is the operator's
    to fix, and no restart fixes it: BentoML's supervisor would restart the worker for ever, never ready and never
    gone. So a serving worker asks `bentoml serve` (its parent) to stop, and the container or unit exits."""
    if bentoml.server_context.worker_index is None:
        return  # not a serving worker (a script, a test): the exception is enough
    log.critical("cannot serve: %s; stopping bentoml serve", exc)
    os.kill(os.getppid(), signal.SIGTERM)


def tune_garbage_collector() -> None:
    """Make the cycle collector's pauses rare and short; measured on /predict, 1 worker, 16 connections:
    p99 132 ms -> 38 ms and +13% throughput (docs/benchmarks.md).

    Everything alive after start-up (modules, BentoML, ONNX Runtime) lives as long as the worker, so it is
    frozen out of the collector's generations. Python's default thresholds (700, 10, 10) then run a full
    collection over every in-flight request's objects several times a second, each 100+ ms at load;
    larger thresholds still collect cycles, about a hundred times less often.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def rejection(exc: ClientError) -> JSONResponse:
    """A client mistake as `{"error": ..., "request_id": ...}` with its 4xx status and headers (Retry-After,
    Connection)."""
    return JSONResponse(
        {"error": str(exc), "request_id": requestid.current()}, status_code=exc.status, headers=exc.headers
    )


def answered(ctx: bentoml.Context, response: JSONResponse) -> JSONResponse:
    """`response` as a BentoML API method's answer: BentoML sets the status from ctx, so ctx gets it."""
    ctx.response.status_code = response.status_code
    return response


API_ROUTES = api_routes(MNIST.apis)  # {route: API method name}
# The first added is the outermost of ours: the fast path answers the API routes (request IDs included) and skips
# the rest; everything else gets its request ID from RequestIds.
if SETTINGS.fast_path:
    MNIST.add_asgi_middleware(
        FastPath, routes=API_ROUTES, timeout_s=SETTINGS.request_timeout_s, cors_origins=SETTINGS.cors_origins,
        access_log=SETTINGS.access_log, patterns=[(v2.INFER_PATH, OPEN_INFERENCE.infer)],
    )  # fmt: skip
MNIST.add_asgi_middleware(RequestIds, access_log=SETTINGS.access_log)
MNIST.add_asgi_middleware(web.RelativeRedirects)  # Location without the client's Host (web.py)
if not SETTINGS.tracing:
    # BentoML's OpenTelemetry middleware makes a span for every request even with no exporter configured;
    # excluded URLs skip it after one regex search. MNIST_TRACING=1 traces the API routes too.
    MNIST.config["tracing"] = {
        **MNIST.config.get("tracing", {}),
        "excluded_urls": [re.escape(route) + r"(\?|$)" for route in API_ROUTES] + [v2.INFER_PATH.pattern + r"(\?|$)"],
    }
