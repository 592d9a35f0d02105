"""One request's images through one model: preprocessing, inference, metrics, the JSON answers.

Blocking (Pillow, numpy, ONNX Runtime): the service calls these in worker threads.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import RequestError
from ..imaging.preprocess import (
    ImageError,
    candidates,
    choose,
    decode_image,
    header_pixels,
    pixels_to_array,
    preprocess,
    read_digits,
    to_png,
)
from ..settings import Settings
from .cancel import raise_if_abandoned
from .metrics import inference_seconds, metrics, prediction_count
from .runtime import Model, ModelCard

# Images up to this many pixels are cheap enough (< 0.5 ms) to preprocess on the event loop.
SMALL_PIXELS = 128 * 128


def classify(
    model: Model, files: Sequence[tuple[str, bytes]], return_image: bool, settings: Settings
) -> list[dict[str, Any]]:
    """Uploaded image files (name, bytes) -> one answer each, in order; ImageError names the bad file."""
    pixels = np.empty((len(files), 28, 28), dtype=np.float32)
    observe = metrics().preprocess_seconds.observe
    for i, (name, data) in enumerate(files):
        raise_if_abandoned()  # nobody is waiting for the answer any more (cancel.py)
        start = time.perf_counter()
        try:
            pixels[i] = preprocess(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
        except ImageError as exc:
            if len(files) == 1:
                raise
            raise ImageError(exc.status, f"images[{i}] ({name}): {exc}") from exc
        observe(time.perf_counter() - start)
    raise_if_abandoned()
    return answers(model, pixels, return_image)


def is_small(data: bytes) -> bool:
    """Whether the image's header declares at most SMALL_PIXELS pixels (a PNG's in ~1 us, others' ~20 us:
    nothing is decoded). Not an image, or a broken one: False, and classify() says so, in a thread.

    The byte size says nothing here: a blank 4096x4096 PNG compresses to a few kilobytes.
    """
    return 0 < header_pixels(data) <= SMALL_PIXELS


def classify_pixels(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """A /predict_pixels JSON body -> its answer; ImageError(422) for a bad pixel array."""
    if "pixels" not in body:
        raise RequestError(400, f"missing field 'pixels' (fields received: {', '.join(body) or 'none'})")
    return answers(model, pixels_to_array(body["pixels"])[np.newaxis], return_image=False)[0]


def read_number(model: Model, data: bytes, settings: Settings) -> dict[str, Any]:
    """One image of a number (one or more rows of digits) -> the text read and each digit's answer and box.

    Every candidate goes through the model in one batch: each glyph, and for a glyph wide enough to be digits that
    touch, its cut into them too; the cut is taken when the model's evidence for its least sure digit beats that
    for the whole (preprocess.choose).
    A row break in the text is a newline.
    """
    start = time.perf_counter()
    image = decode_image(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    rows = read_digits(image, max_digits=settings.max_digits)
    metrics().preprocess_seconds.observe(time.perf_counter() - start)
    raise_if_abandoned()
    found = candidates(rows)
    pixels = np.stack([c.pixels for c in found])
    probabilities, scores, top_logits = timed(model, model.predict_for_reading, pixels)
    found_answers = answers_from(model.card, probabilities, scores, pixels, return_image=False, count=False)
    chosen = choose(rows, top_logits.tolist())
    chosen_rows = [[(found[k], found_answers[k]) for k in row] for row in chosen]
    digits = []
    for reading, answer in (pair for row in chosen_rows for pair in row):
        count_prediction(model.card, answer["digit"])
        del answer["model"], answer["version"]
        digits.append({**answer, "box": list(reading.box)})
    metrics().read_digits.observe(len(digits))
    labels = model.card.labels
    text = "\n".join("".join(labels[answer["digit"]] for _, answer in row) for row in chosen_rows)
    return {"text": text, "digits": digits, "model": model.card.name, "version": model.card.version}


def answers(model: Model, pixels: np.ndarray, return_image: bool, count: bool = True) -> list[dict[str, Any]]:
    """pixels (N, 28, 28) -> N answers: digit, confidence, status, the 10 probabilities, model and version.

    `count=False` leaves mnist_predictions_total to the caller (for candidates not all of which are answered).
    """
    probabilities, scores = timed(model, model.predict_with_scores, pixels)
    return answers_from(model.card, probabilities, scores, pixels, return_image, count)


def timed(model: Model, run: Callable[[np.ndarray], Any], pixels: np.ndarray) -> Any:
    """`run(pixels)`, one ONNX Runtime call of `model`, counted in mnist_inference_seconds."""
    start = time.perf_counter()
    outputs = run(pixels)
    inference_seconds(model.card.name, model.card.version).observe(time.perf_counter() - start)
    return outputs


def answers_from(
    card: ModelCard, probabilities: np.ndarray, scores: np.ndarray, pixels: np.ndarray, return_image: bool, count: bool
) -> list[dict[str, Any]]:
    """The answers for a model run's outputs (see `answers`)."""
    digits = probabilities.argmax(axis=1)
    out = []
    for row, digit, score, image in zip(probabilities, digits, scores, pixels, strict=True):
        if count:
            count_prediction(card, int(digit))
        answer = {
            "digit": int(digit),
            "confidence": float(row[digit]),
            "status": answer_status(card, float(row[digit]), float(score)),
            "probabilities": row.tolist(),
            "model": card.name,
            "version": card.version,
        }
        if return_image:
            answer["image"] = base64.b64encode(to_png(image)).decode("ascii")
        out.append(answer)
    return out


def answer_status(card: ModelCard, confidence: float, digit_score: float) -> str:
    """The answer's status: "not_a_digit" when the model's digit score is below its threshold, "uncertain" when
    the (calibrated) confidence is below the model's uncertain threshold, else "ok". Both thresholds come from
    the ONNX file's metadata (chosen by training on validation data)."""
    if digit_score < card.ood_threshold:
        return "not_a_digit"
    if confidence < card.uncertain_threshold:
        return "uncertain"
    return "ok"


def count_prediction(card: ModelCard, digit: int) -> None:
    prediction_count(card.name, card.version, card.labels[digit]).inc()
