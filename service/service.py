"""The BentoML service: uploaded digits in, probabilities out (API described in README.md, "HTTP API").

Thin on purpose: preprocess.py turns bytes into pixels, runtime.py owns ONNX Runtime and the model cards,
uploads.py reads bodies within limits, answers.py runs a request's images through a model.
"""

from __future__ import annotations

import gc
from typing import Any

import bentoml
from bentoml._internal.context import server_context
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import web
from .accept import spread_accepts
from .answers import CLIENT_ERRORS, classify, classify_pixels, is_small, read_number
from .connections import harden_worker
from .runtime import Registry
from .settings import Settings
from .ui import ui_app
from .uploads import JSONAnswer, MultipartRequest, RawRequest, read_images, read_json
from .work import Offloader, request_pixels

SETTINGS = Settings.from_env()
if SETTINGS.workers > 1:
    spread_accepts(SETTINGS.workers)  # else one worker takes every keep-alive connection (see accept.py)
if server_context.worker_index is not None:  # a worker process, not `bentoml serve` itself
    harden_worker(SETTINGS)  # header timeout, graceful drain, exit with the parent (see connections.py)
# BentoML's CORS middleware, only for the origins named (off by default).
CORS = {
    "cors": {
        "enabled": True,
        "access_control_allow_origins": list(SETTINGS.cors_origins),
        "access_control_allow_methods": ["GET", "POST"],
        "access_control_allow_headers": ["Content-Type"],
    }
}


async def model_cards(_: Request) -> JSONResponse:
    registry: Registry = bentoml.get_current_service().registry
    return JSONResponse({"default": registry.default, "models": registry.cards()})


# BentoML APIs answer POST only; GET /model is a one-route app, matched only for that path.
model_app = Starlette(routes=[Route("/model", model_cards, methods=["GET"]), *web.routes])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(model_app, path="/")
# BentoML keeps every request's state alive until its timeout timer fires, even after the answer is sent:
# at ~1,000 requests/s a 30 s timeout holds ~30,000 requests' objects and makes each full garbage
# collection take 200+ ms (measured, docs/benchmarks.md). Our slowest legitimate request is far below 10 s.
@bentoml.service(
    name="mnist",
    workers=SETTINGS.workers,
    threads=SETTINGS.threads,
    traffic={"timeout": SETTINGS.request_timeout_s},
    **({"http": CORS} if SETTINGS.cors_origins else {}),
)
class MNIST:
    def __init__(self) -> None:
        self.registry = Registry.load(SETTINGS)
        self.work: Offloader | None = None
        tune_garbage_collector()

    @bentoml.api(route="/predict", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def predict(self, ctx: bentoml.Context) -> JSONResponse:
        """One image: multipart file field `image` (fields `model`, `return_image`), or a raw image/* body."""
        try:
            upload = await read_images(
                ctx.request, field="image", max_files=1, max_bytes=SETTINGS.max_bytes,
                too_many="send one image per request to /predict, or several to /predict_batch",
                timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"))
            args = (model, upload.files, upload.flag("return_image"), SETTINGS)
            # A digit-sized image (the usual upload) costs ~0.2 ms: less than handing it to a thread.
            if is_small(upload.files[0][1]):
                answers = classify(*args)
            else:
                pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
                answers = await self._offload(classify, *args, pixels=pixels, request=ctx.request)
            return JSONResponse(answers[0])
        except CLIENT_ERRORS as exc:
            return reject(ctx, exc)

    @bentoml.api(route="/predict_batch", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def predict_batch(self, ctx: bentoml.Context) -> JSONResponse:
        """Up to MNIST_MAX_BATCH images in repeated file field `images`; answers in request order."""
        try:
            upload = await read_images(
                ctx.request, field="images", max_files=SETTINGS.max_batch, max_bytes=SETTINGS.max_bytes,
                too_many=f"too many images: the limit is {SETTINGS.max_batch} per request (MNIST_MAX_BATCH)",
                allow_raw=False, timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"))
            pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
            answers = await self._offload(
                classify, model, upload.files, upload.flag("return_image"), SETTINGS, pixels=pixels, request=ctx.request
            )
            return JSONResponse({"predictions": answers, "model": model.card.name, "version": model.card.version})
        except CLIENT_ERRORS as exc:
            return reject(ctx, exc)

    @bentoml.api(route="/read", input_spec=MultipartRequest, output_spec=JSONAnswer)
    async def read(self, ctx: bentoml.Context) -> JSONResponse:
        """A number: every digit on one image (multipart field `image`, or a raw image/* body), left to right."""
        try:
            upload = await read_images(
                ctx.request, field="image", max_files=1, max_bytes=SETTINGS.max_bytes,
                too_many="send one image per request to /read", timeout_s=SETTINGS.body_timeout_s,
            )  # fmt: skip
            model = self.registry.get(upload.fields.get("model"))
            pixels = request_pixels(upload.files, SETTINGS.max_request_pixels)
            data = upload.files[0][1]
            return JSONResponse(
                await self._offload(read_number, model, data, SETTINGS, pixels=pixels, request=ctx.request)
            )
        except CLIENT_ERRORS as exc:
            return reject(ctx, exc)

    @bentoml.api(route="/predict_pixels", input_spec=RawRequest, output_spec=JSONAnswer)
    async def predict_pixels(self, ctx: bentoml.Context) -> JSONResponse:
        """JSON `{"pixels": 28 rows of 28 numbers in [0, 1], white on black, "model": optional}`."""
        try:
            body = await read_json(ctx.request, max_bytes=SETTINGS.max_bytes, timeout_s=SETTINGS.body_timeout_s)
            model = self.registry.get(body.get("model"))
            return JSONResponse(await self._offload(classify_pixels, model, body))
        except CLIENT_ERRORS as exc:
            return reject(ctx, exc)

    @bentoml.api(route="/ping", input_spec=RawRequest, output_spec=JSONAnswer)
    async def ping(self) -> JSONResponse:
        """Does nothing: the cost of the HTTP stack alone, the floor for benchmarks."""
        return JSONResponse({"ok": True})

    async def _offload(self, func: Any, *args: Any, pixels: int = 0, request: Request | None = None) -> Any:
        # Decoding and inference block: run them in threads, at most MNIST_THREADS at a time per worker,
        # so the event loop keeps accepting requests; `pixels` (from the images' headers) are held from the
        # worker's MNIST_MAX_INFLIGHT_PIXELS while they decode; work stops when `request`'s client is gone
        # (see work.py). Created inside the loop, which the budget belongs to.
        if self.work is None:
            self.work = Offloader(SETTINGS.threads, SETTINGS.max_inflight_pixels)
        return await self.work.run(func, *args, pixels=pixels, request=request)


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


def reject(ctx: bentoml.Context, exc: Exception) -> JSONResponse:
    """A client mistake as `{"error": ...}` with its 4xx status (BentoML takes the status from ctx)."""
    ctx.response.status_code = getattr(exc, "status", 400)
    return JSONResponse({"error": str(exc)}, headers=getattr(exc, "headers", None))


MNIST.add_asgi_middleware(web.RelativeRedirects)  # Location without the client's Host (web.py)
