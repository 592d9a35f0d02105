"""POST /read over real HTTP: numbers composed from real MNIST test digits, read by a real `bentoml serve`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from conftest import Digit, Server, metric
from PIL import Image

TIMEOUT = 30
SIDE = 100  # each digit drawn 100 px tall

pytestmark = pytest.mark.slow  # a real `bentoml serve`


def post(server: Server, path: str, png: bytes, **fields: str) -> requests.Response:
    files = {"image": ("number.png", png, "image/png")}
    return requests.post(f"{server.url}{path}", files=files, data=fields, timeout=TIMEOUT)


def big(digit: Digit) -> np.ndarray:
    return np.asarray(Image.fromarray(np.rint(digit.pixels * 255).astype(np.uint8)).resize((SIDE, SIDE)), np.float32)


def number_png(digits: list[Digit], step: int = SIDE + 20, rows: int = 1) -> tuple[bytes, list[int]]:
    """Dark ink on white paper: the digits in a row (`step` px apart; less than SIDE makes them touch), or
    split over `rows` rows; also the x where each digit's cell starts."""
    per_row = -(-len(digits) // rows)
    width, height = 60 + step * (per_row - 1) + SIDE + 60, 40 + rows * (SIDE + 40)
    ink = np.zeros((height, width), np.float32)
    lefts = []
    for i, digit in enumerate(digits):
        top, left = 40 + (i // per_row) * (SIDE + 40), 60 + (i % per_row) * step
        ink[top : top + SIDE, left : left + SIDE] = np.maximum(ink[top : top + SIDE, left : left + SIDE], big(digit))
        lefts.append(left)
    out = io.BytesIO()
    Image.fromarray(np.rint(255 - ink).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue(), lefts


@pytest.fixture(scope="module")
def readable(server: Server, mnist_digits: list[Digit]) -> list[Digit]:
    """The fixture digits that /predict gets right and sure ("ok") one by one, drawn as they are drawn here (so
    /read is judged on segmentation: a digit the model doubts may rightly lose to a cut of it into two)."""
    right = []
    for digit in mnist_digits[:50]:
        png, _ = number_png([digit])
        answer = post(server, "/predict", png).json()
        if answer.get("digit") == digit.label and answer.get("status") == "ok":
            right.append(digit)
    assert len(right) >= 30
    return right


def test_a_number_is_read_left_to_right_with_boxes(server: Server, readable: list[Digit]) -> None:
    for start in range(0, 20, 5):
        digits = readable[start : start + 5]
        png, lefts = number_png(digits)
        response = post(server, "/read", png)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text"] == "".join(str(d.label) for d in digits)
        assert body["model"] == "mnist-cnn" and body["version"]
        assert [d["digit"] for d in body["digits"]] == [d.label for d in digits]
        for answer, left in zip(body["digits"], lefts, strict=True):
            x, y, w, h = answer["box"]
            assert left - 2 <= x and x + w <= left + SIDE + 2 and y >= 40 - 2 and y + h <= 40 + SIDE + 2
            assert abs(sum(answer["probabilities"]) - 1) < 1e-4
            assert answer["status"] in ("ok", "uncertain", "not_a_digit")


def test_two_rows_are_read_as_two_lines(server: Server, readable: list[Digit]) -> None:
    digits = readable[:6]
    png, _ = number_png(digits, rows=2)
    body = post(server, "/read", png).json()
    labels = "".join(str(d.label) for d in digits)
    assert body["text"] == f"{labels[:3]}\n{labels[3:]}"


def test_touching_digits_are_split(server: Server, readable: list[Digit]) -> None:
    read = 0
    pairs = [readable[i : i + 2] for i in range(0, 20, 2)]
    for pair in pairs:
        png, _ = number_png(pair, step=SIDE - 30)  # 30 px of the boxes overlap: strokes touch or nearly
        body = post(server, "/read", png).json()
        assert len(body["digits"]) == 2, body["text"]
        read += body["text"] == f"{pair[0].label}{pair[1].label}"
    assert read >= 0.7 * len(pairs)


def test_a_broken_digit_is_one_digit(server: Server, readable: list[Digit]) -> None:
    for digit in readable[:10]:
        pixels = np.rint(digit.pixels * 255).astype(np.uint8)
        cut = Digit(digit.name, b"", digit.label, digit.pixels.copy())
        rows = np.flatnonzero(pixels.max(axis=1) > 0)
        cut.pixels[(rows[0] + rows[-1]) // 2] = 0  # a one-pixel gap across the middle: 4 px at 100 px
        png, _ = number_png([cut])
        assert len(post(server, "/read", png).json()["digits"]) == 1


@pytest.mark.parametrize("enlarged", [False, True], ids=["28x28-png", "on-paper"])
def test_a_single_digit_reads_as_predict_answers(server: Server, readable: list[Digit], enlarged: bool) -> None:
    for digit in readable[:10]:
        png = number_png([digit])[0] if enlarged else digit.png
        predicted = post(server, "/predict", png).json()
        (answer,) = post(server, "/read", png).json()["digits"]
        assert answer["digit"] == predicted["digit"]
        assert answer["probabilities"] == predicted["probabilities"]
        assert answer["status"] == predicted["status"]


def test_raw_body_and_model_choice(server: Server, readable: list[Digit]) -> None:
    png, _ = number_png(readable[:3])
    response = requests.post(
        f"{server.url}/read?model=mnist-mlp", data=png, headers={"Content-Type": "image/png"}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "mnist-mlp" and len(response.json()["digits"]) == 3


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_boxes_are_in_the_uploads_pixels_after_exif_rotation(
    server: Server, readable: list[Digit], orientation: int
) -> None:
    """A phone's photo stored sideways with an EXIF orientation: read upright, boxes in the upright picture's
    pixels, the same as for the upright upload."""
    upright_png, _ = number_png(readable[:3])
    upright = Image.open(io.BytesIO(upright_png))
    # What the camera stored: the upright picture turned so that applying the orientation turns it back.
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])  # fmt: skip
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    out = io.BytesIO()
    stored.save(out, format="PNG", exif=exif)
    expected = post(server, "/read", upright_png).json()
    body = post(server, "/read", out.getvalue()).json()
    assert body["text"] == expected["text"] == "".join(str(d.label) for d in readable[:3])
    assert [d["box"] for d in body["digits"]] == [d["box"] for d in expected["digits"]]
    width, height = upright.size
    assert all(x + w <= width and y + h <= height for x, y, w, h in (d["box"] for d in body["digits"]))


def test_read_refuses_what_it_cannot_read(server: Server, readable: list[Digit]) -> None:
    blank = io.BytesIO()
    Image.new("L", (300, 200), 255).save(blank, format="PNG")
    response = post(server, "/read", blank.getvalue())
    assert response.status_code == 400 and "no digit found" in response.json()["error"]

    response = post(server, "/read", b"not an image at all")
    assert response.status_code == 400 and "not an image" in response.json()["error"]

    response = post(server, "/read", number_png(readable[:2])[0], model="mnist-nope")
    assert response.status_code == 404 and "unknown model 'mnist-nope'" in response.json()["error"]

    # 36 digits, 4 rows of 9: over the default MNIST_MAX_DIGITS of 32.
    png, _ = number_png([readable[i % len(readable)] for i in range(36)], rows=4)
    response = post(server, "/read", png)
    assert response.status_code == 413
    assert "found 36 digits" in response.json()["error"] and "MNIST_MAX_DIGITS" in response.json()["error"]

    # The server still reads afterwards.
    assert post(server, "/read", number_png(readable[:2])[0]).status_code == 200


def test_predict_points_a_number_to_read(server: Server, readable: list[Digit]) -> None:
    response = post(server, "/predict", number_png(readable[:4])[0])
    assert response.status_code == 422
    assert "found 4 digits side by side" in response.json()["error"] and "/read" in response.json()["error"]


def test_metrics_count_digits_read(server: Server, readable: list[Digit]) -> None:
    """Each series moves by exactly what one /read of three digits did (the names alone are there at 0)."""
    digits = readable[:3]
    series = {
        "pages": ("mnist_read_digits_count", {}),
        "digits": ("mnist_read_digits_sum", {}),
        "pages of 3 or fewer": ("mnist_read_digits_bucket", {"le": "3.0"}),
        "pages of 2 or fewer": ("mnist_read_digits_bucket", {"le": "2.0"}),
        "answers": ("mnist_predictions_total", {"model": "mnist-cnn"}),
        "decoded": ("mnist_preprocess_seconds_count", {}),
        "runs": ("mnist_inference_seconds_count", {"model": "mnist-cnn"}),
    }
    labels = [str(d.label) for d in digits]
    per_label = {label: labels.count(label) for label in labels}

    def values() -> dict[str, float]:
        out = {key: metric(server.url, name, **labels) for key, (name, labels) in series.items()}
        for label in per_label:
            out[f"digit {label}"] = metric(server.url, "mnist_predictions_total", model="mnist-cnn", digit=label)
        return out

    before = values()
    response = post(server, "/read", number_png(digits)[0])
    assert response.status_code == 200 and response.json()["text"] == "".join(labels), response.text
    after = values()
    moved = {key: after[key] - before[key] for key in after}
    assert moved["pages"] == 1 and moved["digits"] == 3, moved
    assert moved["pages of 3 or fewer"] == 1 and moved["pages of 2 or fewer"] == 0, moved
    # Only the digits answered count as predictions (not the cuts tried and left), each under its digit.
    assert moved["answers"] == 3 and all(moved[f"digit {label}"] == n for label, n in per_label.items()), moved
    # The page is decoded once, and all its candidates go through the model in one call.
    assert moved["decoded"] == 1 and moved["runs"] == 1, moved
