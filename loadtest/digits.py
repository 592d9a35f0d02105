"""Real MNIST test digits as PNG uploads, multipart bodies for them, and the check that the server knows them.

The digits come from the verified IDX files (`training.data.load_arrays`, no torch). A load test must count a
wrong digit as a failure, but even a good model misreads a few test digits (0.5 % for the CNN), so the pool is
calibrated first: every digit is classified once, the pool's accuracy must reach the model's own measured
accuracy (less a margin for the small sample), and only the digits the model gets right are kept. Under load,
any different answer then means the server mixed up or corrupted something (a batching bug, a race).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image

from training.data import load_arrays

# The pool's accuracy may fall this far below the model's test accuracy before calibration fails:
# a 256-digit sample of a 99 % model has a standard deviation of about 0.6 %.
ACCURACY_MARGIN = 0.03
EXIT_CALIBRATION = 3  # the load test's exit status when the server got the digits wrong before any load
CALIBRATION_CHUNK = 128  # images per /predict_batch request while calibrating (below MNIST_MAX_BATCH)
# One boundary for every body this process builds, so that pre-built bodies share one Content-Type header
# (wrk sends them with a single header set); 32 random hex digits will not occur inside a small PNG.
BOUNDARY = f"mnist-{uuid.uuid4().hex}"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class Digit:
    index: int  # position in the MNIST test set, to name a digit in a failure message
    label: int
    png: bytes


@dataclass(frozen=True)
class Calibration:
    model: str
    accuracy: float  # of the whole pool, as the server answered it
    expected: float  # the model's test accuracy from GET /model (or 0 when the card has none)
    kept: list[Digit]

    @property
    def ok(self) -> bool:
        return self.accuracy >= self.expected - ACCURACY_MARGIN


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def mnist_test_digits(count: int, seed: int = 0) -> list[Digit]:
    """`count` seeded random MNIST test digits (uint8 white on black, as in the files) as PNG files."""
    arrays = load_arrays()
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    picks = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return [Digit(int(i), int(labels[i]), png_bytes(images[i])) for i in picks]


def multipart(files: Sequence[tuple[str, str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: files are (field, file name, bytes).

    Built by hand so Locust's fast client, wrk and requests all send the very same bytes.
    """
    boundary = BOUNDARY
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), CONTENT_TYPE


def single_body(digit: Digit, model: str | None = None) -> tuple[bytes, str]:
    return multipart([("image", f"t10k-{digit.index}.png", digit.png)], {"model": model} if model else None)


def batch_body(digits: Sequence[Digit], model: str | None = None) -> tuple[bytes, str]:
    files = [("images", f"t10k-{d.index}.png", d.png) for d in digits]
    return multipart(files, {"model": model} if model else None)


def model_card(base_url: str, model: str | None = None) -> dict:
    """The card of `model` (default: the server's default model) from GET /model."""
    answer = requests.get(f"{base_url}/model", timeout=30)
    answer.raise_for_status()
    body = answer.json()
    name = model or body["default"]
    for card in body["models"]:
        if card["name"] == name:
            return card
    raise ValueError(f"the server at {base_url} has no model {name!r}; it has {[c['name'] for c in body['models']]}")


def calibrate(base_url: str, digits: Sequence[Digit], model: str | None = None) -> Calibration:
    """Classify every digit once through /predict_batch; keep those the model gets right."""
    card = model_card(base_url, model)
    kept: list[Digit] = []
    for start in range(0, len(digits), CALIBRATION_CHUNK):
        chunk = digits[start : start + CALIBRATION_CHUNK]
        body, content_type = batch_body(chunk, card["name"])
        answer = requests.post(
            f"{base_url}/predict_batch", data=body, headers={"Content-Type": content_type}, timeout=60
        )
        if answer.status_code != 200:
            raise RuntimeError(f"calibration: /predict_batch answered {answer.status_code}: {answer.text[:300]}")
        predictions = answer.json()["predictions"]
        if len(predictions) != len(chunk):
            raise RuntimeError(f"calibration: sent {len(chunk)} images, got {len(predictions)} answers")
        kept += [d for d, p in zip(chunk, predictions, strict=True) if p["digit"] == d.label]
    accuracy = len(kept) / max(1, len(digits))
    return Calibration(card["name"], accuracy, float(card.get("test_accuracy") or 0.0), kept)


def number_png(digits: Sequence[Digit]) -> bytes:
    """The digits' 28x28 tiles side by side on a black strip with an 8 px border: a number, as /read takes it."""
    tiles = [np.asarray(Image.open(io.BytesIO(d.png))) for d in digits]
    return png_bytes(np.pad(np.concatenate(tiles, axis=1), 8))


def readable_numbers(base_url: str, digits: Sequence[Digit], size: int = 3, model: str | None = None) -> list:
    """(text, multipart body, content type) for numbers made of `size` of the digits that /read reads right.

    Like `calibrate`: the load test then checks every answer, and a number the service cannot read at all is a
    matter for the accuracy benchmark (benchmarks/read_accuracy.py), not for load.
    """
    out = []
    for start in range(0, len(digits) - size + 1, size):
        group = digits[start : start + size]
        text = "".join(str(d.label) for d in group)
        body, content_type = multipart(
            [("image", "number.png", number_png(group))], {"model": model} if model else None
        )
        response = requests.post(f"{base_url}/read", data=body, headers={"Content-Type": content_type}, timeout=30)
        if response.status_code == 200 and response.json().get("text") == text:
            out.append((text, body, content_type))
    return out
