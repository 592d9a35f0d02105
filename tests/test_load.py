"""A short, bounded load run against a real `bentoml serve`: it fails on errors or wrong answers, not on speed.

Locust (8 users, 20 s, loadtest/locustfile.py) posts real MNIST test digits to /predict and /predict_batch
and checks every digit against its label; the run goes through `python -m loadtest.run`, as `make loadtest`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mnist_fixture import mnist_test

from loadtest.digits import Digit, calibrate, mnist_test_digits
from loadtest.server import REPO, LocalServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mnist_test() is None, reason="MNIST test files not found (run `python -m training data`)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    log = tmp_path_factory.mktemp("load-server") / "server.log"
    with LocalServer(env={"MNIST_MODELS": "mnist-cnn", "MNIST_WORKERS": "1"}, log_path=log) as running:
        yield running


def test_short_load_run_has_no_errors_and_no_wrong_answers(server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [sys.executable, "-m", "loadtest.run", "--url", server.url, "--users", "8", "--time", "20"]
    run = subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    explain = f"{run.stdout}\n{run.stderr}\n{(out / 'locust.log').read_text()[-3000:] if out.exists() else ''}"
    assert run.returncode == 0, explain
    assert summary["failures"] == 0 and summary["wrong_answers"] == 0, summary["failure_kinds"]
    # Not a speed test, but a run that sent almost nothing would prove nothing: 8 users pausing at most
    # 0.3 s between requests send several hundred in 20 s even on a slow, busy runner.
    assert summary["requests"] >= 100, summary
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "chart.png"):
        assert (out / name).stat().st_size > 0, name


def test_calibration_catches_wrong_answers(server: LocalServer) -> None:
    """The answer check can fail: the same digits with every label shifted by one must all count as wrong."""
    digits = mnist_test_digits(64, seed=3)
    right = calibrate(server.url, digits)
    mislabelled = [Digit(d.index, (d.label + 1) % 10, d.png) for d in digits]
    wrong = calibrate(server.url, mislabelled)
    assert right.ok and right.accuracy >= 0.95, right.accuracy
    assert not wrong.ok and wrong.accuracy <= 0.05, wrong.accuracy
