"""The Open Inference Protocol (KServe V2, as Triton, KServe and MLServer speak it) beside our own routes
(docs/protocol.md): health, server and model metadata, readiness per model and version, and `infer`.

The routes only translate HTTP (KServe's v2_endpoints -> dataplane split): tensors.py decodes and encodes the bodies,
the registry (inference/runtime.py) names the models and versions, and the answers come from the very functions
behind /predict (inference/answers.py `classify`, `answers`): an image sent as BYTES goes through the same
preprocessing, and FP32 pixels through the same model run and status thresholds. Blocking work runs in the
service's worker threads within its pixel budget (work.py) unless it is as small as /predict's inline case.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

import numpy as np
from bentoml import get_current_service, server_context
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from ..errors import ClientError, RequestError
from ..inference.answers import answers, classify, is_small
from ..inference.runtime import Model, Registry
from ..settings import Settings
from . import requestid
from .tensors import HEADER_LENGTH, InferRequest, InputSpec, Output, dump, encode_response, parse_request
from .uploads import _receiving, read_body
from .work import request_pixels

SERVER_NAME = "mnist"  # the BentoML service's name (service.py)
PLATFORM = "onnxruntime_onnx"  # Triton's name for what computes the answers
EXTENSIONS = ["binary_tensor_data"]
# The input of encoded image files (PNG, JPEG, ...: whatever /predict takes), one element per image. The pixel input
# is named by the model itself (its ONNX input name, from the model card).
BYTES_INPUT = "image_bytes"
OUTPUTS = ("probabilities", "digit", "status")
# Bodies up to this size are parsed on the event loop (a one-digit request is ~1-8 kB: a few microseconds); larger
# ones (up to MNIST_MAX_BATCH images, or MNIST_MAX_BYTES of JSON) in a worker thread.
INLINE_BYTES = 32 * 1024
INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
JSON = "application/json"


def server_version() -> str:
    """This project's version when it is installed; in a built bento (which installs only the lock), the bento's."""
    try:
        return importlib.metadata.version("mnist-serving")
    except importlib.metadata.PackageNotFoundError:
        return server_context.bento_version


class OpenInference:
    """The V2 routes of one worker (`routes`, for a Starlette app mounted at "/"); `infer` also for the fast path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Triton's model_repository extension (http/admin.py) exists only with a management token.
        extensions = EXTENSIONS + (["model_repository"] if settings.admin_token else [])
        self.server = {"name": SERVER_NAME, "version": server_version(), "extensions": extensions}
        model = "/models/{name}"
        version = "/models/{name}/versions/{version}"
        v2 = Starlette(
            routes=[
                Route("/health/live", self.live, methods=["GET"]),
                Route("/health/ready", self.ready, methods=["GET"]),
                *(Route(path, self.model_metadata, methods=["GET"]) for path in (model, version)),
                *(Route(path + "/ready", self.model_ready, methods=["GET"]) for path in (model, version)),
                *(Route(path + "/infer", self.infer, methods=["POST"]) for path in (model, version)),
            ],
            # Every answer under /v2 in the protocol's error format, Starlette's own 404 and 405 included.
            exception_handlers={HTTPException: http_error},
        )
        self.routes = [Route("/v2", self.server_metadata, methods=["GET"]), Mount("/v2", app=v2)]

    async def server_metadata(self, _: Request) -> Response:
        return answer(self.server)

    async def live(self, _: Request) -> Response:
        return answer({"live": True})

    async def ready(self, _: Request) -> Response:
        """200 when every model is ready at its default version, else 503 (KServe's status for "not ready")."""
        registry = current_registry()
        ready = all(registry.ready(name) for name in registry.names())
        return answer({"ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        try:
            registry = current_registry()
            model = registry.get(name, version)
            return answer(
                {
                    "name": name,
                    "versions": registry.versions(name),
                    "platform": PLATFORM,
                    "inputs": [spec.as_dict() for spec in input_specs(model)],
                    "outputs": [
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.card.labels)]},
                        {"name": "digit", "datatype": "INT64", "shape": [-1]},
                        {"name": "status", "datatype": "BYTES", "shape": [-1]},
                    ],
                }
            )
        except ClientError as exc:
            return error(exc)

    async def model_ready(self, request: Request) -> Response:
        """200 when the model (its default version, or the one named) is served by every worker; 503 while this worker
        has it but another not yet (loading), 404 for a model or version this worker does not have."""
        name, version = request.path_params["name"], request.path_params.get("version")
        registry = current_registry()
        try:
            if registry.ready(name, version):
                return answer({"name": name, "ready": True})
            model = registry.get(name, version)  # 404 for a model or version unknown here
        except ClientError as exc:
            return error(exc)
        not_yet = f"model {name!r} version {model.card.version!r} is not served by every worker yet"
        return answer({"name": name, "ready": False, "error": not_yet}, 503)

    async def infer(self, request: Request) -> Response:
        """POST /v2/models/{name}[/versions/{version}]/infer; for the fast path too (it has no path_params)."""
        try:
            name, version = request.path_params.get("name"), request.path_params.get("version")
            if name is None:  # the fast path: no router ran
                match = INFER_PATH.fullmatch(request.scope["path"])
                if match is None:
                    raise RequestError(404, f"no such route: {request.scope['path']}")
                name, version = match["name"], match["version"]
            settings = self.settings
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise RequestError(415, "compressed request bodies are not accepted: send it without Content-Encoding")
            async with _receiving(settings.body_timeout_s):
                body = await read_body(request, settings.max_bytes)
            service = get_current_service()
            model = service.registry.get(name, version)
            args = (body, request.headers.get(HEADER_LENGTH), input_specs(model), OUTPUTS, settings.max_batch)
            if len(body) <= INLINE_BYTES:
                infer_request = parse_request(*args)
            else:
                infer_request = await service._offload(parse_request, *args, request=request)
            data = infer_request.data
            if isinstance(data, np.ndarray):
                work: tuple[Any, ...] = (answer_pixels, model, name, infer_request)
                inline, pixels = infer_request.batch == 1, 0  # nothing to decode: the pixels are in memory
            else:
                work = (answer_files, model, name, infer_request, settings)
                inline = infer_request.batch == 1 and is_small(data[0])
                pixels = (
                    0
                    if inline
                    else request_pixels([(BYTES_INPUT, image) for image in data], settings.max_request_pixels)
                )
            if inline:  # as cheap as /predict's inline case: one small image, one model run
                content, header_length = work[0](*work[1:])
            else:
                content, header_length = await service._offload(*work, pixels=pixels, request=request)
            if header_length is None:
                return Response(content, media_type=JSON)
            return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
        except ClientError as exc:
            return error(exc)


def current_registry() -> Registry:
    return get_current_service().registry


def input_specs(model: Model) -> tuple[InputSpec, InputSpec]:
    """The model's inputs: its own pixel tensor (name and shape from its ONNX metadata), and encoded image files."""
    card = model.card
    return InputSpec(card.input_name, "FP32", tuple(card.metadata["input_shape"])), InputSpec(
        BYTES_INPUT, "BYTES", (-1,)
    )


def answer_pixels(model: Model, name: str, request: InferRequest) -> tuple[bytes, int | None]:
    """An FP32 input (N, 1, 28, 28) in [0, 1], white on black (the model's own convention) -> the response body."""
    pixels = request.data
    assert isinstance(pixels, np.ndarray)
    # NaN fails both comparisons.
    if not ((pixels >= 0.0) & (pixels <= 1.0)).all():
        raise RequestError(
            422, f"input {request.input.name!r}: pixel values must be in [0, 1] (divide 0-255 values by 255)"
        )
    return respond(model, name, request, answers(model, pixels.reshape(-1, 28, 28), return_image=False))


def answer_files(model: Model, name: str, request: InferRequest, settings: Settings) -> tuple[bytes, int | None]:
    """A BYTES input of encoded image files -> the response body, the files read exactly as /predict reads them."""
    files = [(BYTES_INPUT, image) for image in request.data]
    return respond(model, name, request, classify(model, files, False, settings))


def respond(model: Model, name: str, request: InferRequest, found: list[dict[str, Any]]) -> tuple[bytes, int | None]:
    """The response body (and its JSON header's length, when binary) for /predict's answers, outputs as asked."""
    count = len(found)
    outputs = []
    for output, binary in request.outputs:
        if output == "probabilities":
            tensor = Output(
                output, "FP32", (count, len(model.card.labels)), [p for a in found for p in a["probabilities"]]
            )
        elif output == "digit":
            tensor = Output(output, "INT64", (count,), [a["digit"] for a in found])
        else:
            tensor = Output(output, "BYTES", (count,), [a["status"] for a in found])
        outputs.append((tensor, binary))
    return encode_response(name, model.card.version, request.id, outputs)


def answer(content: dict[str, Any], status: int = 200) -> Response:
    return Response(dump(content), status_code=status, media_type=JSON)


def error(exc: ClientError) -> Response:
    """The protocol's error body, `{"error": ...}`, with our request ID (as service.py's `rejection`)."""
    return Response(
        dump({"error": str(exc), "request_id": requestid.current()}),
        status_code=exc.status,
        headers=exc.headers,
        media_type=JSON,
    )


async def http_error(_: Request, exc: Exception) -> Response:
    """Starlette's 404 (no such route) and 405 (wrong method) under /v2, in the protocol's error format."""
    assert isinstance(exc, HTTPException)
    return error(ClientError(exc.status_code, str(exc.detail), headers=exc.headers))
