"""training/outliers.py: the non-digit images are in MNIST's format, reproducible, and the sets are disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from training import outliers, shapes
from training.data import load_arrays


@pytest.fixture(scope="module")
def training_set() -> np.ndarray:
    return outliers.training_outliers(600, seed=0)


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, list[str]]:
    return outliers.held_out_outliers(450, seed=1)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    values = image.astype(np.float64)
    total = values.sum()
    return (values.sum(1) @ np.arange(28)) / total, (values.sum(0) @ np.arange(28)) / total


@pytest.fixture(scope="module")
def pairs() -> np.ndarray:
    return outliers.touching_pairs(load_arrays()["train-images-idx3-ubyte"][:1000], 300, seed=0)


@pytest.mark.parametrize("which", ["training_set", "held_out", "pairs"])
def test_images_are_in_mnist_format(which: str, request: pytest.FixtureRequest) -> None:
    images = request.getfixturevalue(which)
    images = images[0] if isinstance(images, tuple) else images
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    offsets = []
    for image in images:
        assert image.max() >= 64, "every image has ink (small specks are anti-aliased below 255)"
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21  # fits MNIST's 20x20 box (+1 for rounding)
        cy, cx = centre_of_mass(image)
        offsets.append(max(abs(cy - 14), abs(cx - 14)))
    # The centre of mass at (14, 14), as in MNIST, unless the shift would push the 20x20 box out of the field.
    assert np.mean(np.array(offsets) <= 1.0) >= 0.95 and max(offsets) <= 5
    # Like MNIST digits: white ink on a black background (the border is black).
    assert images[:, 0, :].mean() < 5 and images[:, :, 0].mean() < 5


def test_mnist_digits_pass_through_the_same_conversion_unchanged_in_shape() -> None:
    digits = load_arrays()["t10k-images-idx3-ubyte"][:50]
    for digit in digits:
        again = outliers.to_mnist(digit.astype(np.float32) / 255)
        assert abs(centre_of_mass(again)[0] - centre_of_mass(digit)[0]) <= 1.0
        assert np.corrcoef(again.ravel(), digit.ravel())[0, 1] > 0.8


def test_same_seed_same_images_other_seed_other_images() -> None:
    a, b = outliers.training_outliers(50, seed=3), outliers.training_outliers(50, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, outliers.training_outliers(50, seed=4))


def test_held_out_set_uses_other_faces_and_other_families(held_out) -> None:
    assert not set(outliers.TRAINING_FACES) & set(outliers.HELD_OUT_FACES)
    assert not set(outliers.training_families()) & set(outliers.held_out_families())
    _, families = held_out
    assert set(families) == set(outliers.held_out_families())  # every family is in the set


def test_letters_shaped_like_digits_are_left_out() -> None:
    for letter in "OoIlZzSsBgq":
        assert letter not in outliers.LETTERS
    assert {"A", "E", "x", "k"} <= set(outliers.LETTERS)


def test_a_missing_font_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(outliers, "FONT_DIR", tmp_path)
    with pytest.raises(outliers.FontError, match="fonts-dejavu-core"):
        outliers.training_outliers(5, seed=0)


def test_touching_pairs_are_two_digits_wide_and_reproducible(pairs: np.ndarray) -> None:
    digits = load_arrays()["train-images-idx3-ubyte"][:1000]
    again = outliers.touching_pairs(digits, 300, seed=0)
    assert np.array_equal(pairs, again)
    assert not np.array_equal(pairs, outliers.touching_pairs(digits, 300, seed=1))

    def aspect(images: np.ndarray) -> np.ndarray:
        ink = images > 40
        height = ink.any(axis=2).sum(axis=1)
        return ink.any(axis=1).sum(axis=1) / np.maximum(height, 1)

    # Two digits side by side fill the 20x20 box across, where one digit is taller than wide.
    assert np.median(aspect(pairs)) > 1.0 > np.median(aspect(digits))
    # One blob of ink, as the segmenter would find it: every column between the first and the last inked one
    # has ink (the digits touch or overlap).
    for image in pairs[:100]:
        cols = np.flatnonzero((image > 0).any(axis=0))
        assert (image[:, cols[0] : cols[-1] + 1] > 0).any(axis=0).all()


@pytest.fixture(scope="module")
def held_out_shapes() -> tuple[np.ndarray, list[str]]:
    return shapes.drawn_shapes(330, seed=shapes.HELD_OUT_SEED)


def test_drawn_shapes_are_in_mnist_format_and_every_family_is_drawn(held_out_shapes) -> None:
    images, families = held_out_shapes
    assert images.dtype == np.uint8 and images.shape == (330, 28, 28)
    assert set(families) == set(shapes.FAMILIES)
    for image in images:
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        assert image.max() >= 64 and max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21
    assert images[:, 0, :].mean() < 5 and images[:, :, 0].mean() < 5


def test_held_out_shapes_are_not_among_the_training_outliers(held_out_shapes) -> None:
    """Same hands, other seed: not one held-out drawing is an image outlier exposure trained on."""
    training = outliers.training_outliers(4000, seed=0)
    seen = {image.tobytes() for image in training}
    assert not any(image.tobytes() in seen for image in held_out_shapes[0])
    # ...and the training set does draw shapes (a quarter of it by the families' weights).
    weights = {name: weight for name, (_, weight) in outliers.training_families().items()}
    assert weights["drawn shapes"] / sum(weights.values()) == pytest.approx(4 / 16)


def test_drawn_shapes_vary_in_stroke_width() -> None:
    """From a fine pen to a thick marker: the ink's share of the 28x28 image spans wider than MNIST's digits'."""
    images, _ = shapes.drawn_shapes(300, seed=5)
    ink = (images > 64).mean(axis=(1, 2))
    digits = (load_arrays()["t10k-images-idx3-ubyte"][:1000] > 64).mean(axis=(1, 2))
    assert np.quantile(ink, 0.1) < np.quantile(digits, 0.1) + 0.01
    assert np.quantile(ink, 0.9) > np.quantile(digits, 0.9) + 0.05


def test_drawn_shapes_can_be_left_out_for_an_ablation() -> None:
    assert "drawn shapes" not in outliers.training_families(drawn_shapes=False)
    assert set(outliers.training_families()) - set(outliers.training_families(drawn_shapes=False)) == {"drawn shapes"}
