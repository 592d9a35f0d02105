"""Locust scenario: people uploading real MNIST digits, mostly one at a time, sometimes a batch or a number.

Run it through `python -m loadtest.run` (starts a server, writes the report and the chart), or by hand:

    .venv/bin/python -m locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:3000

Every answer is checked: a wrong digit (against the MNIST label) or a wrong number of answers is a failure,
just like an HTTP error. Environment: LOADTEST_MODEL (model name; default the server's), LOADTEST_POOL
(digits drawn from the MNIST test set, default 512), LOADTEST_SEED, LOADTEST_MAX_PAUSE (seconds between a user's
requests, at most; default 0.3).
"""

from __future__ import annotations

import logging
import os
import random

import gevent
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.exception import StopUser

from loadtest.digits import (
    EXIT_CALIBRATION,
    Digit,
    batch_body,
    calibrate,
    mnist_test_digits,
    readable_numbers,
    single_body,
)

log = logging.getLogger(__name__)

MODEL = os.environ.get("LOADTEST_MODEL") or None
POOL_SIZE = int(os.environ.get("LOADTEST_POOL", "512"))
SEED = int(os.environ.get("LOADTEST_SEED", "0"))
MAX_PAUSE = float(os.environ.get("LOADTEST_MAX_PAUSE", "0.3"))  # seconds a user waits between requests, at most
BATCH_SIZES = (8, 16, 32, 64)  # what a client with a page of digits (a form, a scanned sheet) sends at once

# Filled once per run by on_test_start: digits the model is known to get right, and their request bodies.
POOL: list[Digit] = []
SINGLE_BODIES: list[tuple[Digit, bytes, str]] = []
NUMBER_BODIES: list[tuple[str, bytes, str]] = []  # three-digit numbers /read reads right, for its task


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: object) -> None:
    if POOL:
        return
    try:
        calibration = calibrate(environment.host.rstrip("/"), mnist_test_digits(POOL_SIZE, SEED), MODEL)
    except Exception as exc:
        return _give_up(environment, f"calibration failed: {exc}")
    log.info(
        "calibration: %s got %d of %d digits right (%.2f %%; its test accuracy %.2f %%)",
        calibration.model, len(calibration.kept), POOL_SIZE, 100 * calibration.accuracy, 100 * calibration.expected,
    )  # fmt: skip
    if not calibration.ok:
        # Not a load problem but a wrong server: load would only measure that.
        return _give_up(
            environment,
            f"{calibration.model} classified only {100 * calibration.accuracy:.1f} % of {POOL_SIZE} MNIST test "
            f"digits right; its card says {100 * calibration.expected:.1f} %",
        )
    POOL.extend(calibration.kept)
    SINGLE_BODIES.extend((d, *single_body(d, MODEL)) for d in POOL)
    NUMBER_BODIES.extend(readable_numbers(environment.host.rstrip("/"), POOL[:96], model=MODEL))


def _give_up(environment: Environment, why: str) -> None:
    log.error("%s; stopping the load test", why)
    environment.process_exit_code = EXIT_CALIBRATION
    # Locust swallows exceptions from event handlers, so stop the runner explicitly (from its own loop).
    gevent.spawn(environment.runner.quit)


class DigitUploader(FastHttpUser):
    # A person looks at the answer before sending the next digit; the pause keeps the load realistic
    # (16 users send about 90 requests/s). LOADTEST_MAX_PAUSE=0 makes every user a tight loop.
    wait_time = between(min(0.05, MAX_PAUSE), MAX_PAUSE)

    def on_start(self) -> None:
        if not POOL:  # calibration failed and the runner is quitting: send nothing
            raise StopUser()

    @task(10)
    def predict(self) -> None:
        digit, body, content_type = random.choice(SINGLE_BODIES)
        with self.client.post(
            "/predict", data=body, headers={"Content-Type": content_type}, name="/predict", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            got = response.json().get("digit")
            if got != digit.label:
                response.failure(f"wrong digit: got {got}, MNIST test #{digit.index} is a {digit.label}")

    @task(2)
    def predict_batch(self) -> None:
        digits = random.sample(POOL, random.choice(BATCH_SIZES))
        body, content_type = batch_body(digits, MODEL)
        with self.client.post(
            "/predict_batch",
            data=body,
            headers={"Content-Type": content_type},
            name=f"/predict_batch ({len(digits)})",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            answers = response.json().get("predictions", [])
            if len(answers) != len(digits):
                response.failure(f"sent {len(digits)} images, got {len(answers)} answers")
                return
            wrong = [(d, a.get("digit")) for d, a in zip(digits, answers, strict=True) if a.get("digit") != d.label]
            if wrong:
                d, got = wrong[0]
                response.failure(
                    f"{len(wrong)} wrong of {len(digits)}; e.g. got {got}, MNIST test #{d.index} is a {d.label}"
                )

    @task(1)
    def read_number(self) -> None:
        if not NUMBER_BODIES:
            return
        text, body, content_type = random.choice(NUMBER_BODIES)
        with self.client.post(
            "/read", data=body, headers={"Content-Type": content_type}, name="/read", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif response.json().get("text") != text:
                response.failure(f"read {response.json().get('text')!r}, the number is {text}")

    @task(1)
    def model_card(self) -> None:
        # The UI asks which model answers before the first upload.
        with self.client.get("/model", name="/model", catch_response=True) as response:
            if response.status_code != 200 or not response.json().get("models"):
                response.failure(f"HTTP {response.status_code}: no model list")
