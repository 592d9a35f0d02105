"""The verification gate: a model version takes traffic only after it has read real digits as well as it claims.

The ONNX contract (runtime.read_card: input conventions, labels, status thresholds) is checked when the file is
loaded; the gate adds what no metadata can promise: that the file, run by this ONNX Runtime on this device, reads
the verification digits the service ships (exported/verification-digits.npz: 100 real MNIST test digits of each
class, drawn by training/sample.py) at no less than the test accuracy its metadata claims minus a margin
(MNIST_GATE_MARGIN, 2 points by default), with probabilities that are probabilities.

Why 2 points: on 1,000 digits a model that really is as accurate as it claims lands within 0.5 points of its claim
(one standard error at 98% is 0.44 points), so an honest file fails only if it is ~4.5 standard errors unlucky;
a file with the wrong weights, permuted labels or a broken graph lands tens of points below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import Model

# Rows of probabilities sum to 1 within this (float32 softmax); the answers' contract (docs/api.md).
SUM_TOLERANCE = 1e-4


class GateError(RuntimeError):
    """A version failed the gate; str(e) says which check and by how much."""


@dataclass(frozen=True)
class Digits:
    """The verification digits: pixels float32 (N, 28, 28) in [0, 1], white on black, and their labels."""

    pixels: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, path: Path) -> Digits:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
        return cls(images.astype(np.float32) / np.float32(255), labels.astype(np.int64))


@dataclass(frozen=True)
class Verdict:
    accuracy: float  # on the verification digits
    claimed: float  # the test accuracy the metadata states
    digits: int

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": round(self.accuracy, 4), "claimed": self.claimed, "digits": self.digits}


def verify(model: Model, digits: Digits, margin: float, name: str | None = None) -> Verdict:
    """The verdict on `model` (loaded as `name`, if given); GateError when it must not take traffic."""
    card = model.card
    if name is not None and card.name != name:
        raise GateError(f"the file says it is model {card.name!r} (metadata model_name), not {name!r}")
    if card.test_accuracy is None or not 0.0 < card.test_accuracy <= 1.0:
        raise GateError("its metadata states no test_accuracy in (0, 1], so there is no claim to verify it against")
    try:
        # In batches of 8: ONNX Runtime's CPU arena keeps what the largest batch a session ran needed, so batches
        # of 100 left every worker 57 MiB bigger at idle (3 models, 131 -> 180 MiB in make bench); 8 is as fast
        # here (0.19 s for the three shipped models, 2-core Xeon) and leaves 7 MiB, the digits included.
        pixels = digits.pixels
        probabilities = np.concatenate([model.predict(pixels[i : i + 8]) for i in range(0, len(pixels), 8)])
    except Exception as exc:  # a graph ONNX Runtime loads but cannot run on a batch (ONNX Runtime's errors)
        raise GateError(f"it could not run on the verification digits: {exc}") from exc
    if probabilities.shape != (len(digits.labels), len(card.labels)):
        raise GateError(f"it answered shape {list(probabilities.shape)} for {len(digits.labels)} digits")
    sums = probabilities.sum(axis=1, dtype=np.float64)
    if not np.isfinite(probabilities).all() or np.abs(sums - 1.0).max() > SUM_TOLERANCE or probabilities.min() < 0:
        raise GateError(f"its probabilities are not probabilities (row sums {sums.min():.6f} to {sums.max():.6f})")
    # What a client reads is the label of the top class, so that is what is compared with the true digit.
    read = np.array([card.labels[k] for k in probabilities.argmax(axis=1)])
    accuracy = float((read == digits.labels.astype(str)).mean())
    verdict = Verdict(accuracy, card.test_accuracy, len(digits.labels))
    if accuracy < card.test_accuracy - margin:
        raise GateError(
            f"it read {accuracy:.2%} of the {verdict.digits} verification digits right, below its claimed test "
            f"accuracy {card.test_accuracy:.2%} minus the margin of {margin:.2%} (MNIST_GATE_MARGIN)"
        )
    return verdict
