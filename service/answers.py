"""One request's images through one model: preprocessing, inference, metrics, the JSON answers.

Blocking (Pillow, numpy, ONNX Runtime): the service calls these in worker threads.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .metrics import metrics
from .preprocess import ImageError, pixels_to_array, preprocess, to_png
from .runtime import Model, UnknownModelError
from .settings import Settings
from .uploads import RequestError

# Images up to this many pixels are cheap enough (< 0.5 ms) to preprocess on the event loop.
SMALL_PIXELS = 128 * 128

# Exceptions that are the client's fault: each carries its 4xx `status` and a message naming the problem.
CLIENT_ERRORS = (ImageError, RequestError, UnknownModelError)


def classify(
    model: Model, files: Sequence[tuple[str, bytes]], return_image: bool, settings: Settings
) -> list[dict[str, Any]]:
    """Uploaded image files (name, bytes) -> one answer each, in order; ImageError names the bad file."""
    pixels = np.empty((len(files), 28, 28), dtype=np.float32)
    observe = metrics().preprocess_seconds.observe
    for i, (name, data) in enumerate(files):
        start = time.perf_counter()
        try:
            pixels[i] = preprocess(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
        except ImageError as exc:
            if len(files) == 1:
                raise
            raise ImageError(exc.status, f"images[{i}] ({name}): {exc}") from exc
        observe(time.perf_counter() - start)
    return answers(model, pixels, return_image)


def is_small(data: bytes) -> bool:
    """Whether the image's header declares at most SMALL_PIXELS pixels (~20 us: nothing is decoded).

    The byte size says nothing here: a blank 4096x4096 PNG compresses to a few kilobytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height <= SMALL_PIXELS
    except Exception:  # not an image, or a broken one: classify() will say so, in a thread
        return False


def classify_pixels(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """A /predict_pixels JSON body -> its answer; ImageError(422) for a bad pixel array."""
    if "pixels" not in body:
        raise RequestError(400, f"missing field 'pixels' (fields received: {', '.join(body) or 'none'})")
    return answers(model, pixels_to_array(body["pixels"])[np.newaxis], return_image=False)[0]


def answers(model: Model, pixels: np.ndarray, return_image: bool) -> list[dict[str, Any]]:
    """pixels (N, 28, 28) -> N answers: digit, confidence, the 10 probabilities, model and version."""
    card = model.card
    m = metrics()
    start = time.perf_counter()
    probabilities = model.predict(pixels)
    m.inference_seconds.labels(card.name).observe(time.perf_counter() - start)
    digits = probabilities.argmax(axis=1)
    out = []
    for row, digit, image in zip(probabilities, digits, pixels, strict=True):
        m.predictions.labels(card.name, card.labels[digit]).inc()
        answer = {
            "digit": int(digit),
            "confidence": float(row[digit]),
            "probabilities": row.tolist(),
            "model": card.name,
            "version": card.version,
        }
        if return_image:
            answer["image"] = base64.b64encode(to_png(image)).decode("ascii")
        out.append(answer)
    return out
