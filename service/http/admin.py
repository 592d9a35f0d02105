"""The management routes of the model repository (inference/repository.py), locked by a bearer token.

Triton's model-repository extension where it has a route (index, load, unload), and TorchServe's idea of a default
version where it has none (default, rollback):

    POST /v2/repository/index                            every version: READY / LOADING / UNAVAILABLE, and why
    POST /v2/repository/models/{name}/load               a new version through the gate: the ONNX file as the body
                                                         (application/octet-stream; ?default=true to make it the
                                                         default), or Triton's JSON {"parameters": {"file:model.onnx":
                                                         <base64>, "default": true}}, or {"parameters": {"version":
                                                         "<v>"}} for a file already in the repository folder
    POST /v2/repository/models/{name}/unload             {"parameters": {"version": "<v>"}}; no version: the model
    POST /v2/repository/models/{name}/default            {"version": "<v>"}
    POST /v2/repository/models/{name}/rollback           the previous default again

Every change answers once every worker serves it (200), or says which workers have not yet (202). TorchServe's
management API, open by default, was how ShellTorch (CVE-2023-43654) took servers: these routes exist only when
MNIST_ADMIN_TOKEN is set, want `Authorization: Bearer <token>` (401 without, 403 with another), compare it in constant
time, and never log it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from bentoml import get_current_service
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ClientError, RequestError
from ..inference.repository import Change, Repository, RepositoryError
from . import requestid

# An MNIST model is a few MB; far larger is a mistake, or an attack on the disk.
MAX_MODEL_BYTES = 256 * 1024 * 1024
JSON_TYPES = ("application/json", "")
Handler = Callable[[Request], Awaitable[JSONResponse]]


def routes(token: str, body_timeout_s: float, converge_timeout_s: float) -> list[Route]:
    """The management routes, each behind `token`; none without one (the routes then do not exist: 404)."""
    if not token:
        return []
    secret = token.encode()

    def locked(handler: Handler) -> Handler:
        async def guarded(request: Request) -> JSONResponse:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return _error(401, "this route needs `Authorization: Bearer <MNIST_ADMIN_TOKEN>`",
                              {"WWW-Authenticate": 'Bearer realm="mnist-admin"'})  # fmt: skip
            if not hmac.compare_digest(given.strip().encode(), secret):
                return _error(403, "the bearer token is not this server's MNIST_ADMIN_TOKEN")
            try:
                return await handler(request)
            except RepositoryError as exc:
                return _error(exc.status, str(exc), exc.headers, exc.details)
            except ClientError as exc:
                return _error(exc.status, str(exc), exc.headers)

        return guarded

    async def index(request: Request) -> JSONResponse:
        body = await _json(request, body_timeout_s)
        rows = await asyncio.to_thread(_repository().index)
        if body.get("ready") is True:
            rows = [row for row in rows if row["state"] == "READY"]
        return JSONResponse(rows)

    async def load(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        data, parameters = await _model_upload(request, body_timeout_s)
        make_default = _flag(parameters.get("default", request.query_params.get("default", False)))
        version = parameters.get("version")
        if version is not None and not isinstance(version, str):
            raise RequestError(400, "parameters.version must be a string")
        change = await asyncio.to_thread(_repository().load, name, data, version, make_default)
        return await _answer(change, converge_timeout_s)

    async def unload(request: Request) -> JSONResponse:
        parameters = _parameters(await _json(request, body_timeout_s))
        version = parameters.get("version")
        if version is not None and not isinstance(version, str):
            raise RequestError(400, "parameters.version must be a string")
        change = await asyncio.to_thread(_repository().unload, request.path_params["name"], version)
        return await _answer(change, converge_timeout_s)

    async def default(request: Request) -> JSONResponse:
        body = await _json(request, body_timeout_s)
        version = body.get("version", _parameters(body).get("version"))
        if not isinstance(version, str) or not version:
            raise RequestError(400, 'give the version to make the default: {"version": "<version>"}')
        change = await asyncio.to_thread(_repository().set_default, request.path_params["name"], version)
        return await _answer(change, converge_timeout_s)

    async def rollback(request: Request) -> JSONResponse:
        change = await asyncio.to_thread(_repository().rollback, request.path_params["name"])
        return await _answer(change, converge_timeout_s)

    prefix = "/v2/repository/models/{name}"
    return [
        Route("/v2/repository/index", locked(index), methods=["POST"]),
        Route(f"{prefix}/load", locked(load), methods=["POST"]),
        Route(f"{prefix}/unload", locked(unload), methods=["POST"]),
        Route(f"{prefix}/default", locked(default), methods=["POST"]),
        Route(f"{prefix}/rollback", locked(rollback), methods=["POST"]),
    ]


def _repository() -> Repository:
    repository = getattr(get_current_service(), "repository", None)
    if repository is None:
        raise ClientError(503, "this process serves no model repository (not a serving worker)")
    return repository


async def _answer(change: Change, timeout_s: float) -> JSONResponse:
    repository = _repository()
    key = f"{change.model}/{change.version}" if change.action == "load" else None
    seconds, lagging = await repository.converged(change.generation, key, timeout_s)
    body = change.as_dict() | {"workers": repository.settings.workers, "converged_s": round(seconds, 3)}
    if lagging:
        return JSONResponse(body | {"lagging": lagging}, status_code=202)
    return JSONResponse(body)


async def _body(request: Request, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_MODEL_BYTES:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {MAX_MODEL_BYTES} bytes for a model")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_MODEL_BYTES:
                    raise RequestError(413, f"body is over the limit of {MAX_MODEL_BYTES} bytes for a model")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s (MNIST_BODY_TIMEOUT_S)") from None
    return b"".join(chunks)


async def _json(request: Request, timeout_s: float) -> dict[str, Any]:
    raw = await _body(request, timeout_s)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError(400, "parameters must be a JSON object")
    return parameters


async def _model_upload(request: Request, timeout_s: float) -> tuple[bytes | None, dict[str, Any]]:
    """The ONNX file of a load request (None: load a version from the repository folder) and its parameters."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        data = await _body(request, timeout_s)
        if not data:
            raise RequestError(400, "the body is empty: send the ONNX file (curl --data-binary @model.onnx)")
        return data, {}
    if content_type not in JSON_TYPES:
        raise RequestError(415, "send the ONNX file as application/octet-stream, or Triton's JSON load request")
    parameters = _parameters(await _json(request, timeout_s))
    files = {key: value for key, value in parameters.items() if key.startswith("file:")}
    if len(files) > 1:
        raise RequestError(400, f"one model file per load request, got {', '.join(files)}")
    if not files:
        return None, parameters
    ((key, encoded),) = files.items()
    if not key.endswith(".onnx") or not isinstance(encoded, str):
        raise RequestError(400, f"{key}: give an .onnx file, base64-encoded, as Triton's load request does")
    try:
        return base64.b64decode(encoded, validate=True), parameters
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{key} is not valid base64") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise RequestError(400, f"default must be true or false, got {value!r}")


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, details: dict[str, Any] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "request_id": requestid.current(), **(details or {})}, status_code=status, headers=headers
    )
