"""Writes the sample uploads in examples/ from real MNIST test digits (tests/fixtures/mnist_digits), seeded.

    .venv/bin/python -m examples.make_examples

digit.png is a test digit as MNIST stores it; photo.jpg and number.jpg are test digits photographed the way
benchmarks/preprocess_accuracy.py and benchmarks/read_accuracy.py build their realistic uploads (paper, pen,
uneven light, sensor noise, JPEG). examples/README.md says which digits.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.preprocess_accuracy import PEN_COLOURS, _ink, _lay, _paper, _photo, _put, _shadow
from benchmarks.read_accuracy import _row, _trim

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "tests" / "fixtures" / "mnist_digits"
NUMBER = "2026"


def fixture(index: int) -> np.ndarray:
    return np.asarray(Image.open(DIGITS / f"t10k-{index:04d}.png"))


def first_index_of(label: int) -> int:
    """The test-set index of the first fixture digit with this label."""
    return next(d["index"] for d in json.loads((DIGITS / "labels.json").read_text()) if d["label"] == label)


def photo(index: int, rng: np.random.Generator) -> bytes:
    """One digit written large on paper and photographed: a shadow darkening one side by up to 45%, JPEG."""
    shape = (360, 480)
    ink, _ = _put(_ink(fixture(index), 220, rng), rng, *shape)
    return _photo(_lay(_paper(shape, rng), ink, PEN_COLOURS[0]), rng, _shadow(shape, rng, 0.45))


def number_page(indices: list[int], rng: np.random.Generator) -> bytes:
    """The digits written side by side on paper, photographed (a shadow across the page), as a JPEG."""
    height = 80
    inks = [_trim(_ink(fixture(i), int(height * rng.uniform(0.9, 1.1)), rng)) for i in indices]
    ink = np.pad(_row(inks, [int(height * rng.uniform(0.2, 0.4)) for _ in inks[1:]]), 50)
    return _photo(_lay(_paper(ink.shape, rng), ink, PEN_COLOURS[1]), rng, _shadow(ink.shape, rng, 0.3))


def main() -> None:
    shutil.copyfile(DIGITS / "t10k-0000.png", HERE / "digit.png")  # a 7
    (HERE / "photo.jpg").write_bytes(photo(1, np.random.default_rng(1)))  # a 2
    page = number_page([first_index_of(int(c)) for c in NUMBER], np.random.default_rng(0))
    (HERE / "number.jpg").write_bytes(page)
    for name in ("digit.png", "photo.jpg", "number.jpg"):
        image = Image.open(io.BytesIO((HERE / name).read_bytes()))
        print(f"examples/{name}: {image.size[0]}x{image.size[1]} {image.format}, {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
