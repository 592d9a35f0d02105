"""/read's bars on the read benchmark's own pages (benchmarks/read_accuracy.py, seed 0 as `make bench-read` prints),
read by the service's own `answers.read_number` with a real runtime Model and the default settings: what /read runs,
not a copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mnist_fixture import mnist_test

from benchmarks.read_accuracy import FAMILIES, FONT_DIR, Score, measure
from service.inference.runtime import load_model
from service.settings import Settings

pytestmark = pytest.mark.slow  # 1,000 pages

PAGES = 200
# The goals (issue 12), never moved with a result: numbers of separated digits read whole on 95% of the pages
# and right on 98% of their digits; numbers with a touching pair read whole on 85%; every digit of every family's pages
# right on 98%.
GOALS = {"separated": (0.95, 0.98), "touching": (0.85, None)}
ALL_PAGES_PER_DIGIT = 0.98
# The touching pages' digits alone have no goal of their own: 96.1% recorded (seed 0, docs/preprocessing.md, the
# searched cuts) minus a margin of one point.
TOUCHING_PER_DIGIT = 0.961 - 0.01


@pytest.fixture(scope="module")
def scores(cnn_path: Path) -> dict[str, Score]:
    data = mnist_test()
    if data is None:
        pytest.fail("MNIST test files not found; run `make data`")
    if not any(FONT_DIR.glob("DejaVu*.ttf")):
        pytest.fail(f"no DejaVu fonts in {FONT_DIR} for the `fonts` pages (apt-get install fonts-dejavu-core)")
    settings = Settings()
    model = load_model(cnn_path, "cpu", settings.intra_op_threads)
    return {family: measure(model, family, data, pages=PAGES, seed=0, settings=settings) for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(GOALS))
def test_whole_numbers_are_read_on_the_benchmark_pages(scores: dict[str, Score], family: str) -> None:
    whole, per_digit = GOALS[family]
    score = scores[family]
    assert score.right / score.pages >= whole, score
    if per_digit is not None:
        assert 1 - score.errors / score.length >= per_digit, score


def test_the_digits_of_touching_pairs_are_read(scores: dict[str, Score]) -> None:
    score = scores["touching"]
    assert 1 - score.errors / score.length >= TOUCHING_PER_DIGIT, score


def test_every_digit_of_every_page(scores: dict[str, Score]) -> None:
    errors = sum(score.errors for score in scores.values())
    length = sum(score.length for score in scores.values())
    assert 1 - errors / length >= ALL_PAGES_PER_DIGIT, {family: score for family, score in scores.items()}
