"""The Open Inference Protocol (service/http/v2.py, service/http/tensors.py).

The codec on its own (fast): requests built and responses read by tritonclient's own functions, and every malformed
body refused with its problem named. Then a real `bentoml serve` (slow), spoken to by `tritonclient.http` as its docs
show (binary data on) and by plain JSON over requests, the way curl would: its answers equal /predict's on real MNIST
test digits, and every bad request gets a V2 error (`{"error": ..., "request_id": ...}`) while the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from conftest import TEST_MAX_BYTES, Digit, Server, serve
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.errors import RequestError
from service.http.tensors import InputSpec, Output, encode_response, parse_request
from service.http.v2 import BYTES_INPUT, OUTPUTS

TIMEOUT = 30
SPECS = (InputSpec("image", "FP32", (-1, 1, 28, 28)), InputSpec(BYTES_INPUT, "BYTES", (-1,)))
MAX_BATCH = 4


def parse(body: bytes | dict[str, Any], header_length: int | str | None = None, max_batch: int = MAX_BATCH):
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return parse_request(raw, None if header_length is None else str(header_length), SPECS, OUTPUTS, max_batch)


def fp32_input(pixels: np.ndarray, binary: bool, name: str = "image") -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def bytes_input(files: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput(BYTES_INPUT, [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    return tensor


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


# The codec ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_request_decodes(binary: bool) -> None:
    pixels = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    outputs = [httpclient.InferRequestedOutput("digit", binary_data=binary), httpclient.InferRequestedOutput("status")]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [fp32_input(pixels, binary)], outputs=outputs, request_id="r-1"
    )
    request = parse(body, json_size)
    assert (json_size is not None) == binary
    assert request.id == "r-1"
    assert request.input.name == "image" and request.shape == (2, 1, 28, 28) and request.batch == 2
    np.testing.assert_array_equal(request.data, pixels)  # JSON floats and raw bytes both exact
    assert request.outputs == (("digit", binary), ("status", True))  # tritonclient asks binary by default


def test_no_outputs_named_means_all_of_them_as_the_request_says() -> None:
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [fp32_input(np.zeros((1, 1, 28, 28), np.float32), True)]
    )
    assert parse(body, json_size).outputs == tuple((name, True) for name in OUTPUTS)  # binary_data_output
    plain = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
    assert parse(plain).outputs == tuple((name, False) for name in OUTPUTS)
    assert parse({**plain, "outputs": []}).outputs == tuple((name, False) for name in OUTPUTS)


def test_fp32_json_data_flat_or_nested() -> None:
    pixels = np.linspace(0, 1, 784, dtype=np.float32).reshape(1, 1, 28, 28)
    for data in (pixels.ravel().tolist(), pixels.tolist(), pixels[0, 0].tolist()):
        request = parse({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": data}]})
        np.testing.assert_array_equal(request.data, pixels)
        assert request.data.dtype == np.float32


def test_bytes_binary_and_base64() -> None:
    files = [b"\x89PNG first", b"", b"third \x00\xff"]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([bytes_input(files)])
    assert parse(body, json_size).data == files
    encoded = [base64.b64encode(f).decode() for f in files]
    for parameters in ({}, {"content_type": "base64"}):
        request = parse(
            {"inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [3], "data": encoded, **parameters}]}
        )
        assert request.data == files


def test_response_read_by_tritonclient() -> None:
    probabilities = np.random.default_rng(1).random((2, 10), dtype=np.float32)
    outputs = [
        Output("probabilities", "FP32", (2, 10), probabilities.ravel().tolist()),
        Output("digit", "INT64", (2,), [3, 7]),
        Output("status", "BYTES", (2,), ["ok", "not_a_digit"]),
    ]
    for binary in ((True, True, True), (False, True, False), (False, False, False)):
        body, header_length = encode_response("mnist-cnn", "v1", "r-2", list(zip(outputs, binary, strict=True)))
        assert (header_length is None) == (not any(binary))
        result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
        response = result.get_response()
        assert (response["model_name"], response["model_version"], response["id"]) == ("mnist-cnn", "v1", "r-2")
        np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
        np.testing.assert_array_equal(result.as_numpy("digit"), [3, 7])
        # tritonclient gives BYTES elements as bytes from binary data, as str from JSON
        expected = [b"ok", b"not_a_digit"] if binary[2] else ["ok", "not_a_digit"]
        assert result.as_numpy("status").tolist() == expected


def fp32(shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": "image", "datatype": "FP32", "shape": shape, "data": [0.5] * int(np.prod(shape)), **extra}


def binary_request(tensor: dict[str, Any], data: bytes, **extra: Any) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + data, len(header)


PNG_SIZE = {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}
# (request: a JSON object, or (body, header length)), status, words the message must contain.
BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("not JSON", (b"{inputs", None), 400, "invalid JSON"),
    ("not an object", (b"[1, 2]", None), 400, "must be a JSON object"),
    ("no inputs", {}, 400, "exactly one input"),
    ("two inputs", {"inputs": [fp32([1, 1, 28, 28]), fp32([1, 1, 28, 28])]}, 400, "exactly one input"),
    ("unknown input", {"inputs": [{**fp32([1, 1, 28, 28]), "name": "pixels"}]}, 400, "unknown input 'pixels'"),
    ("wrong datatype", {"inputs": [{**fp32([1, 1, 28, 28]), "datatype": "FP64"}]}, 400, "datatype FP32"),
    ("wrong shape", {"inputs": [fp32([1, 28, 28])]}, 400, "must have shape [N, 1, 28, 28]"),
    ("wrong image size", {"inputs": [fp32([1, 1, 32, 32])]}, 400, "must have shape [N, 1, 28, 28]"),
    ("empty batch", {"inputs": [fp32([0, 1, 28, 28])]}, 400, "no images"),
    ("over the batch limit", {"inputs": [fp32([MAX_BATCH + 1, 1, 28, 28])]}, 413, "MNIST_MAX_BATCH"),
    ("too few values", {"inputs": [{**fp32([1, 1, 28, 28]), "data": [0.5] * 783}]}, 400, "783 values"),
    ("strings as pixels", {"inputs": [{**fp32([1, 1, 28, 28]), "data": ["a"] * 784}]}, 400, "numbers only"),
    ("ragged pixels", {"inputs": [{**fp32([1, 1, 28, 28]), "data": [[0.5], [0.5, 0.5]]}]}, 400, "nested evenly"),
    ("no data", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28]}]}, 400, "neither"),
    ("id not a string", {"id": 7, "inputs": [fp32([1, 1, 28, 28])]}, 400, "'id' must be a string"),
    ("unknown output", {"inputs": [fp32([1, 1, 28, 28])], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    (
        "output twice",
        {"inputs": [fp32([1, 1, 28, 28])], "outputs": [{"name": "digit"}, {"name": "digit"}]},
        400,
        "twice",
    ),
    (
        "binary_data not a flag",
        {"inputs": [fp32([1, 1, 28, 28])], "outputs": [{"name": "digit", "parameters": {"binary_data": 1}}]},
        400,
        "binary_data must be true or false",
    ),
    (
        "classification",
        {"inputs": [fp32([1, 1, 28, 28])], "outputs": [{"name": "digit", "parameters": {"classification": 3}}]},
        400,
        "classification",
    ),
    (
        "not base64",
        {"inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]},
        400,
        "not base64",
    ),
    (
        "another content type",
        {
            "inputs": [
                {
                    "name": BYTES_INPUT,
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": ["x"],
                    "parameters": {"content_type": "str"},
                }
            ]
        },
        400,
        "base64 strings",
    ),
    ("header length not a number", (b"{}", "ten"), 400, "must be a number of bytes"),
    ("header length not ASCII digits", (b"{}", "\u00b2"), 400, "must be a number of bytes"),  # '²'.isdigit()
    ("header length beyond the body", (b"{}", 99), 400, "the body has only 2 bytes"),
    (
        "data and binary size both",
        {"inputs": [fp32([1, 1, 28, 28], parameters={"binary_data_size": 3136})]},
        400,
        "has both",
    ),
    (
        "binary size but no header",
        {
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 4}}
            ]
        },
        400,
        "no Inference-Header-Content-Length",
    ),
    (
        "binary data shorter than its shape",
        binary_request(
            {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 8}},
            bytes(8),
        ),
        400,
        "needs 3136",
    ),
    (
        "binary size not what follows",
        binary_request(
            {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3136}},
            bytes(3000),
        ),
        400,
        "3000 bytes follow",
    ),
    (
        "binary data no input claims",
        binary_request(fp32([1, 1, 28, 28]), bytes(16)),
        400,
        "no input has parameters.binary_data_size",
    ),
    (
        "BYTES element longer than the data",
        binary_request(PNG_SIZE, (100).to_bytes(4, "little") + b"abcd"),
        400,
        "says 100 bytes",
    ),
    (
        "BYTES length cut off",
        binary_request({**PNG_SIZE, "parameters": {"binary_data_size": 2}}, b"\x01\x00"),
        400,
        "cut off",
    ),
    (
        "BYTES count not the shape's",
        binary_request({**PNG_SIZE, "shape": [2]}, (4).to_bytes(4, "little") + b"abcd"),
        400,
        "1 elements of binary data; its shape says 2",
    ),
]


@pytest.mark.parametrize(
    ("request_", "status", "words"), [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_names_its_problem(request_: Any, status: int, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse(*request_) if isinstance(request_, tuple) else parse(request_)
    assert caught.value.status == status
    assert words in str(caught.value)


def test_messages_cut_a_clients_long_values_short() -> None:
    with pytest.raises(RequestError) as caught:
        parse({"inputs": [{**fp32([1, 1, 28, 28]), "name": "x" * 100_000}]})
    assert "unknown input 'xxx" in str(caught.value) and len(str(caught.value)) < 200


def test_bytes_nested_as_deep_as_json_allows() -> None:
    data: Any = base64.b64encode(b"image").decode()
    for _ in range(900):
        data = [data]
    request = parse({"inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [1], "data": data}]})
    assert request.data == [b"image"]


# A real server ----------------------------------------------------------------------------------------------------


def client(url: str) -> httpclient.InferenceServerClient:
    """tritonclient for a server at http://host:port, as its docs make one (it takes host:port)."""
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=TIMEOUT)


def card(server: Server, name: str) -> dict[str, Any]:
    cards = requests.get(f"{server.url}/model", timeout=TIMEOUT).json()["models"]
    return next(c for c in cards if c["name"] == name)


@pytest.fixture(scope="module")
def predicted(server: Server, mnist_digits: list[Digit]) -> dict[str, list[dict[str, Any]]]:
    """/predict's answers for every test digit, per model: what the protocol must answer too."""
    return {
        model: [
            requests.post(
                f"{server.url}/predict",
                files={"image": (d.name, d.png, "image/png")},
                data={"model": model},
                timeout=TIMEOUT,
            ).json()
            for d in mnist_digits
        ]
        for model in server.models
    }


def assert_same_answers(result: httpclient.InferResult, expected: list[dict[str, Any]]) -> None:
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), [a["probabilities"] for a in expected], rtol=0, atol=1e-6
    )
    assert result.as_numpy("digit").tolist() == [a["digit"] for a in expected]
    assert [s.decode() for s in result.as_numpy("status")] == [a["status"] for a in expected]
    assert result.as_numpy("probabilities").dtype == np.float32 and result.as_numpy("digit").dtype == np.int64


@pytest.mark.slow
def test_tritonclient_health_and_metadata(server: Server) -> None:
    triton = client(server.url)
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "mnist" and "binary_tensor_data" in metadata["extensions"] and metadata["version"]
    assert "model_repository" not in metadata["extensions"]  # no management token: no management routes
    for name in server.models:
        info = card(server, name)
        for version in ("", info["version"]):
            model = triton.get_model_metadata(name, version)
            assert model["name"] == name and model["platform"] == "onnxruntime_onnx"
            assert info["version"] in model["versions"]
            assert model["inputs"] == [
                # the pixel input is the ONNX file's own, as its metadata names and shapes it
                {"name": info["input_name"], "datatype": "FP32", "shape": info["metadata"]["input_shape"]},
                {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
            ]
            assert [(o["name"], o["datatype"], o["shape"]) for o in model["outputs"]] == [
                ("probabilities", "FP32", [-1, 10]),
                ("digit", "INT64", [-1]),
                ("status", "BYTES", [-1]),
            ]
            assert triton.is_model_ready(name, version)
    assert not triton.is_model_ready("no-such-model")
    assert not triton.is_model_ready(server.models[0], "no-such-version")
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_model_metadata("no-such-model")


@pytest.mark.slow
def test_tritonclient_fp32_pixels_answer_as_predict(server: Server, mnist_digits: list[Digit], predicted) -> None:
    triton = client(server.url)
    pixels = np.stack([d.pixels for d in mnist_digits])[:, np.newaxis]  # (100, 1, 28, 28), white on black in [0, 1]
    for name in server.models:
        result = triton.infer(name, [fp32_input(pixels, binary=True)])
        assert_same_answers(result, predicted[name])
        assert result.get_response()["model_version"] == card(server, name)["version"]
        single = triton.infer(name, [fp32_input(pixels[:1], binary=True)])  # one image: answered inline
        assert_same_answers(single, predicted[name][:1])


@pytest.mark.slow
def test_tritonclient_png_bytes_answer_as_predict(server: Server, mnist_digits: list[Digit], predicted) -> None:
    triton = client(server.url)
    for name in server.models:
        result = triton.infer(name, [bytes_input([d.png for d in mnist_digits])])
        assert_same_answers(result, predicted[name])
        version = card(server, name)["version"]
        single = triton.infer(name, [bytes_input([mnist_digits[7].png])], model_version=version)
        assert_same_answers(single, predicted[name][7:8])
        assert single.get_response()["model_version"] == version


@pytest.mark.slow
def test_tritonclient_outputs_and_id(server: Server, mnist_digits: list[Digit], predicted) -> None:
    outputs = [httpclient.InferRequestedOutput("status"), httpclient.InferRequestedOutput("digit", binary_data=False)]
    result = client(server.url).infer(
        "mnist-cnn", [bytes_input([d.png for d in mnist_digits[:5]])], outputs=outputs, request_id="my-id-1"
    )
    response = result.get_response()
    assert response["id"] == "my-id-1"
    assert [o["name"] for o in response["outputs"]] == ["status", "digit"]  # only those, in the order asked
    assert response["outputs"][1]["data"] == [a["digit"] for a in predicted["mnist-cnn"][:5]]  # JSON, as asked
    assert result.as_numpy("probabilities") is None


@pytest.mark.slow
def test_plain_json_as_curl_sends_it(server: Server, mnist_digits: list[Digit], predicted) -> None:
    digits = mnist_digits[:3]
    url = f"{server.url}/v2/models/mnist-cnn/infer"
    pixels = {"name": "image", "datatype": "FP32", "shape": [3, 1, 28, 28], "data": [d.pixels.tolist() for d in digits]}
    files = {
        "name": BYTES_INPUT,
        "datatype": "BYTES",
        "shape": [3],
        "data": [base64.b64encode(d.png).decode() for d in digits],
    }
    for tensor in (pixels, files):
        answer = requests.post(url, json={"id": "42", "inputs": [tensor]}, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json" and "x-request-id" in answer.headers
        body = answer.json()
        assert (body["model_name"], body["id"]) == ("mnist-cnn", "42")
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["probabilities"]["shape"] == [3, 10] and outputs["digit"]["datatype"] == "INT64"
        np.testing.assert_allclose(
            np.reshape(outputs["probabilities"]["data"], (3, 10)),
            [a["probabilities"] for a in predicted["mnist-cnn"][:3]],
            rtol=0,
            atol=1e-6,
        )
        assert outputs["digit"]["data"] == [a["digit"] for a in predicted["mnist-cnn"][:3]]
        assert outputs["status"]["data"] == [a["status"] for a in predicted["mnist-cnn"][:3]]


def big_png(side: int) -> bytes:
    return png(np.zeros((side, side), dtype=np.uint8))  # blank: a few kilobytes, side x side pixels decoded


@pytest.mark.slow
def test_every_bad_request_is_a_v2_error_and_the_server_keeps_serving(
    server: Server, mnist_digits: list[Digit]
) -> None:
    base = f"{server.url}/v2/models/mnist-cnn"
    good = {"inputs": [fp32([1, 1, 28, 28])]}

    def files(*images: bytes) -> dict[str, Any]:
        data = [base64.b64encode(i).decode() for i in images]
        return {"inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [len(images)], "data": data}]}

    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", f"{base}/infer", {"data": b"{not json"}, 400, "invalid JSON"),
        ("POST", f"{base}/infer", {"json": {"inputs": [fp32([1, 28, 28])]}}, 400, "shape"),
        ("POST", f"{base}/infer", {"json": {"inputs": [{**fp32([1, 1, 28, 28]), "datatype": "INT8"}]}}, 400, "FP32"),
        ("POST", f"{base}/infer", {"json": {"inputs": [{**fp32([1, 1, 28, 28]), "name": "x"}]}}, 400, "unknown input"),
        ("POST", f"{base}/infer", {"json": {**good, "outputs": [{"name": "logits"}]}}, 400, "unknown output"),
        ("POST", f"{base}/infer", {"json": {"inputs": [fp32([257, 1, 28, 28])]}}, 413, "MNIST_MAX_BATCH"),
        ("POST", f"{base}/infer", {"json": {"inputs": [fp32([1, 1, 28, 28], data=[2.0] * 784)]}}, 422, "[0, 1]"),
        ("POST", f"{base}/infer", {"data": b"{}", "headers": {"Inference-Header-Content-Length": "9"}}, 400, "only 2"),
        ("POST", f"{base}/infer", {"json": files(b"not an image")}, 400, "image"),
        ("POST", f"{base}/infer", {"json": files(mnist_digits[0].png, b"nope")}, 400, "images[1]"),
        ("POST", f"{base}/infer", {"json": files(big_png(4200))}, 413, "too many pixels: 4200x4200"),
        ("POST", f"{base}/infer", {"json": files(*[big_png(4096)] * 5)}, 413, "MNIST_MAX_REQUEST_PIXELS"),
        ("POST", f"{base}/infer", {"data": b"x" * (TEST_MAX_BYTES + 1)}, 413, "MNIST_MAX_BYTES"),
        ("POST", f"{base}/infer", {"data": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
        ("POST", f"{base}/infer", {"data": b"\x1f\x8b", "headers": {"Content-Encoding": "gzip"}}, 415, "Content-Enc"),
        ("POST", f"{server.url}/v2/models/no-such-model/infer", {"json": good}, 404, "unknown model"),
        ("POST", f"{base}/versions/no-such-version/infer", {"json": good}, 404, "no-such-version"),
        ("GET", f"{base}/infer", {}, 405, "Method Not Allowed"),
        ("GET", f"{server.url}/v2/models/no-such-model", {}, 404, "unknown model"),
        ("GET", f"{server.url}/v2/models/no-such-model/ready", {}, 404, "unknown model"),
        ("GET", f"{server.url}/v2/no-such-route", {}, 404, "Not Found"),
    ]
    for method, url, kwargs, status, words in cases:
        answer = requests.request(method, url, timeout=TIMEOUT, **kwargs)
        assert answer.status_code == status, (url, kwargs.get("json"), answer.text)
        body = answer.json()
        assert words in body["error"], body
        assert body["request_id"] == answer.headers["x-request-id"]
    # Still serving, on both paths to the same handler.
    assert requests.post(f"{base}/infer", json=good, timeout=TIMEOUT).status_code == 200
    assert client(server.url).is_model_ready("mnist-cnn")


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with MNIST_FAST_PATH=0: `infer` through its Starlette route instead of the fast path."""
    yield from serve(tmp_path_factory.mktemp("dispatched") / "bentoml.log", MNIST_FAST_PATH="0", MNIST_WORKERS="1")


@pytest.mark.slow
def test_infer_through_the_route_as_through_the_fast_path(
    server: Server, dispatched: Server, mnist_digits: list[Digit], predicted
) -> None:
    for url in (server.url, dispatched.url):
        result = client(url).infer("mnist-cnn", [bytes_input([d.png for d in mnist_digits[:10]])])
        assert_same_answers(result, predicted["mnist-cnn"][:10])
    answer = requests.post(f"{dispatched.url}/v2/models/mnist-cnn/infer", data=b"{", timeout=TIMEOUT)
    assert answer.status_code == 400 and answer.json()["request_id"] == answer.headers["x-request-id"]
