"""The servers `make bench` compares the service with (benchmarks/baseline.py) answer what they should, so a
benchmark never compares against a broken baseline: the FastAPI app gives the service's digits for real MNIST
digits and a 4xx for a non-image; the floor answers its constant. Called in process, as request_costs does."""

from __future__ import annotations

import asyncio
import json

from conftest import Digit

from benchmarks import baseline
from benchmarks.request_costs import call
from loadtest.digits import multipart


def post_image(app: object, digit: Digit | None) -> tuple[int, dict]:
    data = digit.png if digit else b"not an image"
    body, content_type = multipart([("image", "d.png", data)])
    status, answer = asyncio.run(call(app, "/predict", body, content_type))
    return status, json.loads(answer)


def test_the_fastapi_baseline_reads_real_digits(mnist_digits: list[Digit]) -> None:
    right = 0
    for digit in mnist_digits[:20]:
        status, answer = post_image(baseline.fastapi_app, digit)
        assert status == 200 and len(answer["probabilities"]) == 10
        right += answer["digit"] == digit.label
    assert right >= 19
    status, answer = post_image(baseline.fastapi_app, None)
    assert status == 400 and "not an image" in answer["error"]


def test_the_floor_answers_a_constant(mnist_digits: list[Digit]) -> None:
    assert post_image(baseline.floor_app, mnist_digits[0]) == (200, {"ok": True})
