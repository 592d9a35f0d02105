"""The Open Inference Protocol's (KServe V2) tensors on the wire: an `infer` request's body -> numpy arrays and byte
strings, and outputs -> a response body. Pure functions: no HTTP framework, no model (docs/protocol.md).

Two body formats, both in the protocol (and both sent by `tritonclient`):
- JSON: `{"id", "parameters", "inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...]}`; `data` is a flat
  (or nested, row-major) list. A JSON string cannot hold an image file's bytes, so BYTES elements in JSON are base64
  (RFC 4648, standard alphabet with padding); the input may say so with `parameters.content_type: "base64"`
  (MLServer's spelling) and may not name another content type.
- Triton's binary tensor extension: the header `Inference-Header-Content-Length: L` says the body's first L bytes are
  the JSON above, and an input with `parameters.binary_data_size: S` has its data as the next S raw bytes, little
  endian (BYTES: each element a 4-byte little-endian length, then its bytes). Outputs answer the same way when the
  request asks (`parameters.binary_data_output`, or an output's `parameters.binary_data`).

Every mistake is a RequestError naming it: 400 for the protocol's (JSON, names, datatypes, shapes, sizes), 413 for
more elements than the batch limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RequestError

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary tensor extension
BASE64 = "base64"
# Little-endian numpy types of the datatypes this service sends or accepts as numbers.
NUMPY_TYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass(frozen=True)
class InputSpec:
    """An input a model accepts: `shape` with -1 for the batch dimension (the first)."""

    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name!r} ({self.datatype} {list(self.shape)})"


@dataclass(frozen=True)
class InferRequest:
    """A decoded `infer` request with its one input.

    `data`: for FP32, a float32 array of `shape` (a read-only view of the body for binary data); for BYTES, the
    `shape[0]` elements as bytes.
    """

    id: str | None
    input: InputSpec
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    outputs: tuple[tuple[str, bool], ...]  # (name, as binary data) in the order asked, every output when none asked

    @property
    def batch(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class Output:
    """One output tensor of a response: `data` flat in row-major order (floats, ints, or str for BYTES)."""

    name: str
    datatype: str  # FP32, INT64 or BYTES
    shape: tuple[int, ...]
    data: list[Any]


def parse_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[InputSpec],
    outputs: Sequence[str],
    max_batch: int,
) -> InferRequest:
    """An `infer` body (with the Inference-Header-Content-Length header's value, or None) as one of `inputs`, at most
    `max_batch` long in its first dimension, and the `outputs` (names) it asks for. RequestError otherwise."""
    header, binary = _split(body, header_length)
    request = _json_object(header)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, f"'id' must be a string, got {_kind(request_id)}")
    parameters = _parameters(request, "the request")
    binary_output = _flag(parameters, "binary_data_output", "the request's parameters")
    given = request.get("inputs")
    names = " or ".join(spec.describe() for spec in inputs)
    if not isinstance(given, list) or len(given) != 1:
        count = f"{len(given)} inputs" if isinstance(given, list) else "no 'inputs' list"
        raise RequestError(400, f"send exactly one input per request, {names}; got {count}")
    spec, shape, data = _read_input(given[0], {spec.name: spec for spec in inputs}, names, binary, max_batch)
    return InferRequest(request_id, spec, shape, data, _requested_outputs(request, outputs, binary_output))


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: Sequence[tuple[Output, bool]]
) -> tuple[bytes, int | None]:
    """A response body for (output, as binary data) pairs, and the length of its JSON header when any output is
    binary (the value of Inference-Header-Content-Length), else None: then the body is all JSON."""
    tensors, chunks = [], []
    for output, binary in outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary:
            chunk = _to_binary(output)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = output.data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    header = dump(response)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def dump(value: Any) -> bytes:
    """Compact JSON, as Starlette's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    """(the JSON header, the binary data after it: None without the binary extension's header)."""
    if header_length is None:
        return body, None
    value = header_length.strip()
    if not (value.isascii() and value.isdigit()):
        raise RequestError(
            400, f"Inference-Header-Content-Length must be a number of bytes, got {_short(header_length)}"
        )
    length = int(value)
    if length > len(body):
        raise RequestError(400, f"Inference-Header-Content-Length is {length}, but the body has only {len(body)} bytes")
    return body[:length], memoryview(body)[length:]


def _json_object(header: bytes) -> dict[str, Any]:
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid JSON in the inference request: {exc}") from None
    except RecursionError:  # the C parser's guard against deep nesting
        raise RequestError(400, "invalid JSON in the inference request: nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"the inference request must be a JSON object, got {_kind(request)}")
    return request


def _read_input(
    given: Any, specs: Mapping[str, InputSpec], names: str, binary: memoryview | None, max_batch: int
) -> tuple[InputSpec, tuple[int, ...], np.ndarray | list[bytes]]:
    if not isinstance(given, dict):
        raise RequestError(400, f"an input must be a JSON object, got {_kind(given)}")
    name = given.get("name")
    spec = specs.get(name) if isinstance(name, str) else None
    if spec is None:
        raise RequestError(400, f"unknown input {_short(name)}: this model's inputs are {names}")
    datatype = given.get("datatype")
    if datatype != spec.datatype:
        raise RequestError(400, f"input {name!r} must have datatype {spec.datatype}, got {_short(datatype)}")
    shape = _shape(given.get("shape"), spec, max_batch)
    parameters = _parameters(given, f"input {name!r}")
    size = parameters.get("binary_data_size")
    where = f"input {name!r}"
    if size is not None:
        if "data" in given:
            raise RequestError(400, f"{where} has both 'data' and parameters.binary_data_size: send one of them")
        if binary is None:
            raise RequestError(
                400, f"{where} has parameters.binary_data_size, but the request has no Inference-Header-Content-Length"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RequestError(400, f"{where}: binary_data_size must be a number of bytes, got {_short(size)}")
        if size != len(binary):
            raise RequestError(
                400,
                f"{where} has binary_data_size {size}, but {len(binary)} bytes follow the JSON header "
                "(Inference-Header-Content-Length)",
            )
        if spec.datatype == "BYTES":
            return spec, shape, _binary_elements(binary, shape[0], where)
        return spec, shape, _binary_numbers(binary, spec.datatype, shape, where)
    if binary:
        raise RequestError(
            400, f"{len(binary)} bytes follow the JSON header, but no input has parameters.binary_data_size"
        )
    if "data" not in given:
        raise RequestError(400, f"{where} has neither 'data' nor parameters.binary_data_size")
    if spec.datatype == "BYTES":
        content_type = parameters.get("content_type", BASE64)
        if content_type != BASE64:
            raise RequestError(
                400,
                f"{where}: BYTES elements in JSON are base64 strings (parameters.content_type 'base64' or none), "
                f"got content_type {_short(content_type)}; or send raw bytes as binary data",
            )
        return spec, shape, _base64_elements(given["data"], shape[0], where)
    return spec, shape, _json_numbers(given["data"], shape, where)


def _shape(shape: Any, spec: InputSpec, max_batch: int) -> tuple[int, ...]:
    """The input's shape if it fits `spec` (any batch of 1 to `max_batch`); RequestError otherwise."""
    expected = ", ".join("N" if dim == -1 else str(dim) for dim in spec.shape)
    if (
        not isinstance(shape, list)
        or len(shape) != len(spec.shape)
        or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape)
        or any(want != -1 and dim != want for dim, want in zip(shape, spec.shape, strict=True))
    ):
        raise RequestError(
            400, f"input {spec.name!r} must have shape [{expected}] (N from 1 to {max_batch}), got {_short(shape)}"
        )
    if shape[0] == 0:
        raise RequestError(400, f"input {spec.name!r} has shape {shape}: no images")
    if shape[0] > max_batch:
        raise RequestError(413, f"too many images: {shape[0]}; the limit is {max_batch} per request (MNIST_MAX_BATCH)")
    return tuple(shape)


def _binary_numbers(binary: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    dtype = NUMPY_TYPES[datatype]
    needed = math.prod(shape) * dtype.itemsize
    if len(binary) != needed:
        raise RequestError(
            400, f"{where} has {len(binary)} bytes of data; shape {list(shape)} of {datatype} needs {needed}"
        )
    return np.frombuffer(binary, dtype=dtype).reshape(shape)  # a view of the body: no copy


def _json_numbers(data: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"{where}: 'data' must be a list of numbers, got {_kind(data)}")
    try:
        array = np.array(data)
    except (ValueError, TypeError):  # ragged nesting
        raise RequestError(400, f"{where}: 'data' must be a flat list of numbers, or lists nested evenly") from None
    if array.dtype.kind not in "iuf":
        raise RequestError(400, f"{where}: 'data' must hold numbers only")
    count = math.prod(shape)
    if array.size != count:
        raise RequestError(400, f"{where} has {array.size} values; shape {list(shape)} needs {count}")
    return array.astype(np.float32, copy=False).reshape(shape)


def _binary_elements(binary: memoryview, count: int, where: str) -> list[bytes]:
    """BYTES binary data: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset, end = [], 0, len(binary)
    while offset < end:
        if end - offset < _LENGTH.size:
            raise RequestError(400, f"{where}: element {len(elements)}'s 4-byte length is cut off by the end of data")
        (length,) = _LENGTH.unpack_from(binary, offset)
        offset += _LENGTH.size
        if length > end - offset:
            raise RequestError(
                400, f"{where}: element {len(elements)} says {length} bytes, but only {end - offset} are left"
            )
        elements.append(bytes(binary[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise RequestError(400, f"{where} has {len(elements)} elements of binary data; its shape says {count}")
    return elements


def _base64_elements(data: Any, count: int, where: str) -> list[bytes]:
    if not isinstance(data, list):
        raise RequestError(400, f"{where}: 'data' must be a list of base64 strings, got {_kind(data)}")
    elements = []
    for i, value in enumerate(_flat(data)):
        if not isinstance(value, str):
            raise RequestError(400, f"{where}: element {i} must be a base64 string, got {_kind(value)}")
        try:
            elements.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(
                400, f"{where}: element {i} is not base64 (BYTES elements in JSON are base64 strings)"
            ) from None
    if len(elements) != count:
        raise RequestError(400, f"{where} has {len(elements)} elements; its shape says {count}")
    return elements


def _flat(data: list[Any]) -> Iterator[Any]:
    """The values of nested lists, in order (without recursion: JSON may nest as deep as its parser allows)."""
    stack = [iter(data)]
    while stack:
        value = next(stack[-1], stack)  # the stack itself: this level is done
        if value is stack:
            stack.pop()
        elif isinstance(value, list):
            stack.append(iter(value))
        else:
            yield value


def _requested_outputs(
    request: dict[str, Any], outputs: Sequence[str], binary_output: bool
) -> tuple[tuple[str, bool], ...]:
    asked = request.get("outputs")
    if asked is None or asked == []:
        return tuple((name, binary_output) for name in outputs)
    if not isinstance(asked, list):
        raise RequestError(400, f"'outputs' must be a list, got {_kind(asked)}")
    chosen: dict[str, bool] = {}
    for output in asked:
        if not isinstance(output, dict):
            raise RequestError(400, f"an output must be a JSON object, got {_kind(output)}")
        name = output.get("name")
        if name not in outputs:
            raise RequestError(400, f"unknown output {_short(name)}: this model's outputs are {', '.join(outputs)}")
        if name in chosen:
            raise RequestError(400, f"output {name!r} is asked for twice")
        parameters = _parameters(output, f"output {name!r}")
        if "classification" in parameters:
            raise RequestError(400, f"output {name!r}: the classification extension is not supported")
        chosen[name] = _flag(parameters, "binary_data", f"output {name!r}", default=binary_output)
    return tuple(chosen.items())


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError(400, f"the parameters of {where} must be a JSON object, got {_kind(parameters)}")
    return parameters


def _flag(parameters: dict[str, Any], name: str, where: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{where}: {name} must be true or false, got {_short(value)}")
    return value


def _to_binary(output: Output) -> bytes:
    if output.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(raw)) + raw for raw in (value.encode() for value in output.data))
    return np.array(output.data, dtype=NUMPY_TYPES[output.datatype]).tobytes()


def _short(value: Any) -> str:
    """A client's value in a message, cut short: an error names the problem, it does not echo megabytes."""
    return reprlib.repr(value)


def _kind(value: Any) -> str:
    """A JSON value's kind, as a client would name it."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}[
        type(value)
    ]
