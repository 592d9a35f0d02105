"""The service over real HTTP: a real `bentoml serve` (conftest.server) answering real MNIST digits."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from conftest import TEST_MAX_BYTES, Digit, Server, metric, model_file, serve
from PIL import Image, ImageDraw, ImageFont

from training import outliers
from training.outliers import held_out_outliers

TIMEOUT = 30
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # a fresh one (service/http/requestid.py)

pytestmark = pytest.mark.slow  # a real `bentoml serve` (two, with the dispatch one)


@pytest.fixture(scope="module")
def offline(cnn_path: Path, mnist_digits: list[Digit]) -> np.ndarray:
    """Probabilities (100, 10) from ONNX Runtime run directly on the PNGs' pixels: the reference."""
    session = ort.InferenceSession(str(cnn_path), providers=["CPUExecutionProvider"])
    pixels = np.stack([d.pixels for d in mnist_digits])[:, np.newaxis]
    (probabilities,) = session.run(["probabilities"], {"image": pixels})
    return probabilities


def post(server: Server, path: str, **kwargs: object) -> requests.Response:
    return requests.post(f"{server.url}{path}", timeout=TIMEOUT, **kwargs)


def predict(server: Server, digit: Digit, **fields: str) -> requests.Response:
    return post(server, "/predict", files={"image": (digit.name, digit.png, "image/png")}, data=fields)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@functools.cache
def cnn_thresholds() -> tuple[float, float]:
    meta = dict(ort.InferenceSession(str(model_file("mnist-cnn"))).get_modelmeta().custom_metadata_map)
    assert meta["ood_score"] == "max_probability", "these tests derive the status from the probabilities"
    return float(meta["ood_threshold"]), float(meta["uncertain_threshold"])


def expected_status(reference: np.ndarray) -> str:
    """The status the README documents, from the offline probabilities and the thresholds in the file."""
    ood_threshold, uncertain_threshold = cnn_thresholds()
    confidence = float(reference.max())
    if confidence < ood_threshold:
        return "not_a_digit"
    return "uncertain" if confidence < uncertain_threshold else "ok"


def assert_same_answer(answer: dict, reference: np.ndarray) -> None:
    assert answer["digit"] == int(reference.argmax())
    np.testing.assert_allclose(answer["probabilities"], reference, rtol=0, atol=1e-5)
    assert answer["confidence"] == pytest.approx(float(reference.max()), abs=1e-5)
    assert answer["status"] == expected_status(reference)


def test_predict_matches_offline_onnx_runtime(server: Server, mnist_digits: list[Digit], offline) -> None:
    for digit, reference in zip(mnist_digits, offline, strict=True):
        response = predict(server, digit)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same_answer(answer, reference)
        assert answer["model"] == "mnist-cnn" and answer["version"]
        assert "image" not in answer
    correct = sum(int(r.argmax()) == d.label for d, r in zip(mnist_digits, offline, strict=True))
    assert correct >= 97  # the shipped CNN reads these real test digits
    # ... and is sure of nearly all of them: real digits are not "not a digit".
    statuses = [expected_status(r) for r in offline]
    assert statuses.count("ok") >= 95 and "not_a_digit" not in statuses


def test_predict_batch_answers_in_request_order(server: Server, mnist_digits: list[Digit], offline) -> None:
    # Reversed, so that an answer in any order but the request's would not match.
    order = list(reversed(range(len(mnist_digits))))
    files = [("images", (mnist_digits[i].name, mnist_digits[i].png, "image/png")) for i in order]
    response = post(server, "/predict_batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "mnist-cnn" and len(body["predictions"]) == len(order)
    for answer, i in zip(body["predictions"], order, strict=True):
        assert_same_answer(answer, offline[i])
    assert {a["status"] for a in body["predictions"]} <= {"ok", "uncertain", "not_a_digit"}


def test_raw_image_body_with_query_parameters(server: Server, mnist_digits: list[Digit], offline) -> None:
    digit = mnist_digits[0]
    response = post(server, "/predict?return_image=true", data=digit.png, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), offline[0])
    assert "image" in response.json()


def test_return_image_is_the_28x28_the_model_saw(server: Server, mnist_digits: list[Digit]) -> None:
    digit = mnist_digits[3]
    answer = predict(server, digit, return_image="true").json()
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
    # An MNIST digit is already normalised: it passes through preprocessing unchanged.
    np.testing.assert_array_equal(seen, np.rint(digit.pixels * 255).astype(np.uint8))


def test_predict_pixels_matches_offline(server: Server, mnist_digits: list[Digit], offline) -> None:
    response = post(server, "/predict_pixels", json={"pixels": mnist_digits[5].pixels.tolist()})
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), offline[5])


def letter_png(letter: str) -> bytes:
    """A letter typed black on white, 200x200, in a face no model was trained on (training/outliers.py)."""
    image = Image.new("L", (200, 200), 255)
    font = ImageFont.truetype(str(outliers.FONT_DIR / outliers.HELD_OUT_FACES[1]), 150)
    ImageDraw.Draw(image).text((100, 100), letter, fill=0, font=font, anchor="mm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("letter", ["K", "W", "R"])
def test_a_typed_letter_is_not_a_digit(server: Server, letter: str) -> None:
    # Through the real preprocessing. (Smileys are the held-out family the CNN misses: docs/training.md.)
    files = {"image": (f"{letter}.png", letter_png(letter), "image/png")}
    answer = post(server, "/predict", files=files).json()
    assert answer["status"] == "not_a_digit", answer
    batch = post(server, "/predict_batch", files=[("images", files["image"])]).json()
    assert batch["predictions"][0]["status"] == "not_a_digit"


def test_held_out_non_digits_are_flagged_through_predict_pixels(server: Server) -> None:
    # Images from the held-out set (other fonts' letters, shapes, noise, shadows, gradients), straight to the model.
    images, _ = held_out_outliers(count=30, seed=7)
    statuses = []
    for image in images:
        response = post(server, "/predict_pixels", json={"pixels": (image / 255).tolist()})
        assert response.status_code == 200, response.text
        statuses.append(response.json()["status"])
    # The same status as offline ONNX Runtime with the file's thresholds, image by image ...
    session = ort.InferenceSession(str(model_file("mnist-cnn")), providers=["CPUExecutionProvider"])
    (offline,) = session.run(["probabilities"], {"image": (images[:, np.newaxis] / np.float32(255)).astype(np.float32)})
    assert statuses == [expected_status(row) for row in offline]
    # ... and most of them flagged (73.0% of the whole held-out set, docs/training.md).
    assert statuses.count("not_a_digit") >= 18, statuses


def test_a_request_picks_the_model_by_name(server: Server, mnist_digits: list[Digit]) -> None:
    if "mnist-mlp" not in server.models:
        pytest.fail("exported/mnist-mlp.onnx is missing")
    answer = predict(server, mnist_digits[0], model="mnist-mlp").json()
    assert answer["model"] == "mnist-mlp"
    assert answer["digit"] == mnist_digits[0].label
    pixels = {"pixels": mnist_digits[0].pixels.tolist(), "model": "mnist-mlp"}
    assert post(server, "/predict_pixels", json=pixels).json()["model"] == "mnist-mlp"


def test_model_card(server: Server, cnn_path: Path) -> None:
    response = requests.get(f"{server.url}/model", timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "mnist-cnn"
    cards = {card["name"]: card for card in body["models"]}
    assert set(cards) == set(server.models)
    meta = dict(ort.InferenceSession(str(cnn_path)).get_modelmeta().custom_metadata_map)
    cnn = cards["mnist-cnn"]
    assert cnn["version"] == meta["version"]
    assert body["versions"] == {card["name"]: [card["version"]] for card in body["models"]}  # one each, as shipped
    assert cnn["test_accuracy"] == pytest.approx(float(meta["test_accuracy"]))
    assert cnn["labels"] == [str(d) for d in range(10)]
    assert cnn["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert cnn["metadata"]["input_polarity"] == "white-on-black"
    # The status thresholds, as the file carries them.
    assert cnn["ood_score"] == meta["ood_score"]
    assert cnn["ood_threshold"] == pytest.approx(float(meta["ood_threshold"]))
    assert cnn["uncertain_threshold"] == pytest.approx(float(meta["uncertain_threshold"]))


def test_ping_health_and_ui(server: Server) -> None:
    assert post(server, "/ping").json() == {"ok": True}
    for path in ("/livez", "/readyz"):
        assert requests.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 200
    ui = requests.get(f"{server.url}/ui/", timeout=TIMEOUT)
    assert ui.status_code == 200 and ui.headers["content-type"].startswith("text/html")


def test_32_concurrent_clients_all_get_correct_answers(server: Server, mnist_digits: list[Digit], offline) -> None:
    def client(k: int) -> list[tuple[int, dict]]:
        with requests.Session() as session:
            out = []
            for i in range(k, k + 10):
                digit = mnist_digits[i % len(mnist_digits)]
                files = {"image": (digit.name, digit.png, "image/png")}
                response = session.post(f"{server.url}/predict", files=files, timeout=TIMEOUT)
                assert response.status_code == 200, response.text
                out.append((i % len(mnist_digits), response.json()))
            return out

    with ThreadPoolExecutor(32) as pool:
        results = [r for batch in pool.map(client, range(0, 320, 10)) for r in batch]
    assert len(results) == 320
    for i, answer in results:
        assert_same_answer(answer, offline[i])


def test_metrics_count_predictions_and_time_both_stages(server: Server, mnist_digits: list[Digit]) -> None:
    """Each series moves by exactly what the requests did (the names alone are there at 0 before any request)."""
    seven = next(d for d in mnist_digits if d.label == 7)
    batch = mnist_digits[:4]
    series = {
        "sevens": ("mnist_predictions_total", {"model": "mnist-cnn", "digit": "7"}),
        "answers": ("mnist_predictions_total", {"model": "mnist-cnn"}),
        "mlp answers": ("mnist_predictions_total", {"model": "mnist-mlp"}),
        "decoded": ("mnist_preprocess_seconds_count", {}),
        "decoded, every bucket": ("mnist_preprocess_seconds_bucket", {"le": "+Inf"}),
        "decode seconds": ("mnist_preprocess_seconds_sum", {}),
        "runs": ("mnist_inference_seconds_count", {"model": "mnist-cnn"}),
        "run seconds": ("mnist_inference_seconds_sum", {"model": "mnist-cnn"}),
    }

    def values() -> dict[str, float]:
        return {key: metric(server.url, name, **labels) for key, (name, labels) in series.items()}

    before = values()
    for _ in range(3):
        assert predict(server, seven).status_code == 200
    files = [("images", (d.name, d.png, "image/png")) for d in batch]
    assert post(server, "/predict_batch", files=files).status_code == 200
    assert post(server, "/predict_pixels", json={"pixels": seven.pixels.tolist()}).status_code == 200
    assert predict(server, mnist_digits[1], model="not-loaded").status_code == 404
    after = values()
    moved = {key: after[key] - before[key] for key in series}
    sevens_in_batch = sum(d.label == 7 for d in batch)
    assert moved["sevens"] == 3 + sevens_in_batch + 1, moved  # 3 /predict, the batch's, /predict_pixels
    assert moved["answers"] == 3 + len(batch) + 1 and moved["mlp answers"] == 0, moved
    # Decoded: one per uploaded image (not the pixels, not the 404's, refused before its image was decoded).
    assert moved["decoded"] == moved["decoded, every bucket"] == 3 + len(batch), moved
    # One ONNX Runtime call per request: the batch's images go through the model together.
    assert moved["runs"] == 3 + 1 + 1, moved
    assert moved["decode seconds"] > 0 and moved["run seconds"] > 0, moved


def test_a_server_started_later_leaves_this_servers_metrics_alone(
    server: Server, mnist_digits: list[Digit], tmp_path: Path
) -> None:
    """Each test server has a BENTOML_HOME of its own (conftest.serve): a `bentoml serve` empties its home's
    Prometheus folder when it starts, and from a shared home it wiped the running server's counters, whose /metrics
    then showed the new server's."""
    seven = next(d for d in mnist_digits if d.label == 7)
    assert predict(server, seven).status_code == 200
    before = metric(server.url, "mnist_predictions_total")
    assert before >= 1
    starting = serve(tmp_path / "bentoml.log", MNIST_WORKERS="1")
    other = next(starting)
    try:
        assert predict(other, seven).status_code == 200
        assert metric(other.url, "mnist_predictions_total") == 1
        assert metric(server.url, "mnist_predictions_total") == before
        assert predict(server, seven).status_code == 200
        assert metric(server.url, "mnist_predictions_total") == before + 1
    finally:
        starting.close()  # stops it


def offline_statuses(images: np.ndarray) -> list[str]:
    """The documented status of each image (N, 28, 28) in [0, 1], from offline ONNX Runtime's probabilities."""
    session = ort.InferenceSession(str(model_file("mnist-cnn")), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"image": images[:, np.newaxis].astype(np.float32)})
    return [expected_status(row) for row in probabilities]


def test_each_status_is_answered_by_name(server: Server, mnist_digits: list[Digit]) -> None:
    """Each status asserted by its name ("ok", "uncertain", "not_a_digit") on inputs that earn it offline with the
    file's thresholds: real digits, two digits drawn over each other (the model hesitates between them), a letter."""
    pixels = np.stack([d.pixels for d in mnist_digits])
    overlaid = np.stack([np.maximum(pixels[i], pixels[j]) for i in range(10) for j in range(10, 30)])
    images = np.concatenate([pixels, overlaid])
    statuses = offline_statuses(images)
    uncertain = [k for k, status in enumerate(statuses) if status == "uncertain"]
    assert len(uncertain) >= 5, "pick other inputs: too few between the thresholds for this model"
    for k in uncertain:
        answer = post(server, "/predict_pixels", json={"pixels": images[k].tolist()}).json()
        assert answer["status"] == "uncertain", (k, answer["confidence"])
        assert answer["confidence"] < cnn_thresholds()[1]  # still a digit and its probabilities, for a guess
    # A sure digit: "ok", through /predict's whole path; and for one of the uncertain fixture digits, the same there.
    sure = next(i for i, status in enumerate(statuses[: len(pixels)]) if status == "ok")
    assert predict(server, mnist_digits[sure]).json()["status"] == "ok"
    among_fixtures = [k for k in uncertain if k < len(pixels)]
    for k in among_fixtures:
        assert predict(server, mnist_digits[k]).json()["status"] == "uncertain"
    letter = {"image": ("K.png", letter_png("K"), "image/png")}
    assert post(server, "/predict", files=letter).json()["status"] == "not_a_digit"


@pytest.mark.parametrize("path", ["/predict", "/predict_batch", "/read", "/predict_pixels"])
def test_a_content_length_over_the_limit_gets_413_before_the_body_is_sent(server: Server, path: str) -> None:
    """Refused from the header alone: not a byte of the body is sent, and the answer comes at once (a server that
    waited for the body would answer 408 after MNIST_BODY_TIMEOUT_S, 5 s)."""
    content_type = {"/predict_pixels": "application/json", "/predict_batch": "multipart/form-data; boundary=x"}
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type.get(path, 'image/png')}\r\n"
        f"Content-Length: {TEST_MAX_BYTES + 1}\r\n\r\n"
    )
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert time.monotonic() - start < 4
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == (
        f"request body too large: {TEST_MAX_BYTES + 1} bytes; the limit is {TEST_MAX_BYTES} bytes (MNIST_MAX_BYTES)"
    )


def test_several_digits_on_one_image_of_a_batch_get_422_pointing_to_read(
    server: Server, mnist_digits: list[Digit]
) -> None:
    three = np.hstack([d.pixels for d in mnist_digits[:3]])  # side by side, white on black
    files = [
        ("images", (mnist_digits[5].name, mnist_digits[5].png, "image/png")),
        ("images", ("number.png", png(np.rint(three * 255).astype(np.uint8)), "image/png")),
    ]
    response = post(server, "/predict_batch", files=files)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("images[1] (number.png): found 3 digits side by side") and "/read" in error


# -- client mistakes: each gets its 4xx and a message naming it, and the server keeps serving ------------

BLANK = np.zeros((28, 28), dtype=np.uint8)
BOMB = png(np.zeros((5000, 5000), dtype=np.uint8))  # 25 M pixels in a few kB


def too_big_chunks() -> Iterator[bytes]:
    """A body with no Content-Length (chunked), larger than the limit."""
    for _ in range(TEST_MAX_BYTES // 65536 + 2):
        yield b"\0" * 65536


def digit_file(name: str = "image") -> dict:
    return {name: ("d.png", _first_digit_png(), "image/png")}


def _first_digit_png() -> bytes:
    return (Path(__file__).parent / "fixtures" / "mnist_digits" / "t10k-0000.png").read_bytes()


MP = "multipart/form-data"
CASES = {
    "not an image": ("/predict", {"files": {"image": ("a.txt", b"hello, world", "text/plain")}}, 400,
                     "not an image"),
    "truncated png": ("/predict", {"files": {"image": ("t.png", _first_digit_png()[:60], "image/png")}}, 400,
                      "PNG"),
    "empty file": ("/predict", {"files": {"image": ("e.png", b"", "image/png")}}, 400, "empty image"),
    "empty raw body": ("/predict", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400,
                       "empty request body"),
    "no body at all": ("/predict", {}, 415, "unsupported Content-Type '(none)'"),
    "json to /predict": ("/predict", {"json": {"image": "x"}}, 415, "send multipart/form-data"),
    "missing field": ("/predict", {"files": {"model": (None, "mnist-cnn")}}, 400,
                      "missing file field 'image' (fields received: model)"),
    "misnamed field": ("/predict", {"files": digit_file("file")}, 400,
                       "missing file field 'image' (fields received: file)"),
    "text instead of file": ("/predict", {"files": {"image": (None, "http://example.com/7.png")}}, 400,
                             "field 'image' must be a file upload"),
    "malformed multipart": ("/predict", {"data": b"--x\r\nnonsense", "headers": {"Content-Type": MP}}, 400,
                            "malformed multipart body"),
    "multipart cut short": ("/predict", {"data": b'--x\r\nContent-Disposition: form-data; name="image"; '
                                                 b'filename="a.png"\r\n\r\n\x89PNG',
                                         "headers": {"Content-Type": f"{MP}; boundary=x"}}, 400,
                            "malformed multipart body: the body ends inside a part"),
    "too many bytes": ("/predict", {"files": {"image": ("big.png", b"\0" * (TEST_MAX_BYTES + 1))}}, 413,
                       f"the limit is {TEST_MAX_BYTES} bytes"),
    "too many bytes, chunked": ("/predict", {"data": too_big_chunks, "headers": {"Content-Type": "image/png"}},
                                413, f"more than {TEST_MAX_BYTES} bytes"),
    "too many pixels": ("/predict", {"files": {"image": ("bomb.png", BOMB, "image/png")}}, 413,
                        "too many pixels"),
    "blank image": ("/predict", {"files": {"image": ("b.png", png(BLANK), "image/png")}}, 400,
                    "no digit found"),
    "two images to /predict": ("/predict", {"files": [("image", ("a.png", _first_digit_png())),
                                                      ("image", ("b.png", _first_digit_png()))]}, 413,
                               "send one image per request"),
    "unknown model": ("/predict", {"files": digit_file(), "data": {"model": "mnist-xl"}}, 404,
                      "unknown model 'mnist-xl'; loaded models: mnist-cnn"),
    "bad return_image": ("/predict", {"files": digit_file(), "data": {"return_image": "maybe"}}, 400,
                         "'return_image' must be true or false"),
    "too many images": ("/predict_batch", {"files": [("images", ("d.png", _first_digit_png()))] * 257}, 413,
                        "too many images: the limit is 256"),
    "bad image in batch": ("/predict_batch", {"files": [("images", ("ok.png", _first_digit_png())),
                                                        ("images", ("bad.png", b"GIF89a broken"))]}, 400,
                           "images[1] (bad.png): "),
    "raw body to batch": ("/predict_batch", {"data": b"x", "headers": {"Content-Type": "image/png"}}, 415,
                          "file field 'images'"),
    "unknown model, batch": ("/predict_batch", {"files": digit_file("images"), "data": {"model": "x"}}, 404,
                             "unknown model 'x'"),
    "pixels wrong shape": ("/predict_pixels", {"json": {"pixels": [[0.0] * 28] * 27}}, 422,
                           "pixels must have 28 rows, got 27"),
    "pixels flat": ("/predict_pixels", {"json": {"pixels": [0.0] * 784}}, 422, "flat list of 784"),
    "pixels NaN": ("/predict_pixels", {"data": json.dumps({"pixels": [[math.nan] * 28] * 28}),
                                       "headers": {"Content-Type": "application/json"}}, 422,
                   "pixel values must be finite"),
    "pixels out of range": ("/predict_pixels", {"json": {"pixels": [[255] * 28] * 28}}, 422,
                            "outside [0, 1]"),
    "pixels not numbers": ("/predict_pixels", {"json": {"pixels": [["a"] * 28] * 28}}, 422,
                           "is not a number"),
    "pixels missing": ("/predict_pixels", {"json": {"pixel": []}}, 400,
                       "missing field 'pixels' (fields received: pixel)"),
    "invalid json": ("/predict_pixels", {"data": b'{"pixels": [', "headers": {"Content-Type": MP}}, 400,
                     "invalid JSON body"),
    "json not an object": ("/predict_pixels", {"json": [1, 2]}, 400, "must be an object, got list"),
    "unknown model, pixels": ("/predict_pixels", {"json": {"pixels": [[0.0] * 28] * 28, "model": [1]}}, 404,
                              "unknown model '[1]'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_client_mistakes_get_a_4xx_naming_them(server: Server, mnist_digits: list[Digit], case: str) -> None:
    path, kwargs, status, message = CASES[case]
    kwargs = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
    response = post(server, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "request_id"}
    assert message in body["error"]
    assert REQUEST_ID.fullmatch(body["request_id"]) and body["request_id"] == response.headers["x-request-id"]
    # ...and the server still answers correctly.
    after = predict(server, mnist_digits[0])
    assert after.status_code == 200 and after.json()["digit"] == mnist_digits[0].label


# -- the fast path (service/fastpath.py) and BentoML's own dispatch answer alike -------------------------


@pytest.fixture(scope="module")
def bentoml_dispatch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with every per-request feature of BentoML we turn off by default turned back on."""
    log = tmp_path_factory.mktemp("dispatch") / "bentoml.log"
    yield from serve(log, MNIST_FAST_PATH="0", MNIST_ACCESS_LOG="1", MNIST_TRACING="1", MNIST_WORKERS="1")


def without_request_id(response: requests.Response) -> dict:
    body = response.json()
    assert body.pop("request_id") == response.headers["x-request-id"]
    return body


SAME_ANSWER_CASES = ["not an image", "missing field", "malformed multipart", "too many bytes", "unknown model",
                     "two images to /predict", "bad image in batch", "pixels wrong shape"]  # fmt: skip


def test_bentoml_dispatch_answers_like_the_fast_path(
    server: Server, bentoml_dispatch: Server, mnist_digits: list[Digit]
) -> None:
    for digit in mnist_digits[:5]:
        fast, dispatched = predict(server, digit), predict(bentoml_dispatch, digit)
        assert fast.status_code == dispatched.status_code == 200
        assert fast.json() == dispatched.json()
    batch = [("images", (d.name, d.png, "image/png")) for d in mnist_digits[:4]]
    fast_batch = post(server, "/predict_batch", files=batch)
    assert fast_batch.json() == post(bentoml_dispatch, "/predict_batch", files=batch).json()
    for case in SAME_ANSWER_CASES:
        path, kwargs, status, _ = CASES[case]
        kwargs = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
        fast, dispatched = post(server, path, **kwargs), post(bentoml_dispatch, path, **kwargs)
        assert fast.status_code == dispatched.status_code == status, case
        # The same body, each with its own request ID (the one in its header).
        assert without_request_id(fast) == without_request_id(dispatched), case
    # The fast path answered the default server's requests: BentoML's dispatch adds its Server header.
    assert fast_batch.headers.get("server") is None
    assert predict(bentoml_dispatch, mnist_digits[0]).headers["server"] == "BentoML Service/mnist"
    # What the settings bring back: BentoML's request ID (its tracing span), and the access log: a line per answer,
    # with the request ID the answer carries (a 200 is logged only with MNIST_ACCESS_LOG=1).
    assert "x-bentoml-request-id" in predict(bentoml_dispatch, mnist_digits[0]).headers
    assert "x-bentoml-request-id" not in predict(server, mnist_digits[0]).headers
    files = {"image": (mnist_digits[0].name, mnist_digits[0].png, "image/png")}
    for target in (server, bentoml_dispatch):
        answer = post(target, "/predict", files=files, headers={"X-Request-ID": "access-log-check"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "access-log-check"
    logged = re.compile(r"POST /predict -> 200 in [\d.]+ ms \[request_id=access-log-check\]")
    deadline = time.monotonic() + 10
    while not logged.search(bentoml_dispatch.log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logged.search(bentoml_dispatch.log.read_text(errors="replace"))
    assert not re.search(r" -> 200 in ", server.log.read_text(errors="replace"))
