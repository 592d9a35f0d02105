"""benchmarks/ort_devices.py on this machine: the CPU session's answers are the shipped file's recorded accuracy, and
where CUDA cannot start (CI has no GPU) the benchmark says so in the service's own words instead of timing a CPU
session twice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mnist_fixture import mnist_test

from benchmarks.ort_devices import BATCHES, EXPORTED, measure


def test_the_cpu_session_reads_the_test_set_as_recorded() -> None:
    data = mnist_test()
    if data is None:
        pytest.skip("MNIST test files not found")
    images, labels = data
    result = measure(EXPORTED / "mnist-cnn-tiny.onnx", images, labels.astype(np.int64), threads=1)
    recorded = json.loads((EXPORTED / "models.json").read_text())["models"]["mnist-cnn-tiny"]["test_accuracy"]
    assert result["test_accuracy"]["cpu"] == pytest.approx(recorded, abs=1e-4)
    assert set(result["median_ms"]["cpu"]) == {str(b) for b in BATCHES}
    assert all(ms > 0 for ms in result["median_ms"]["cpu"].values())
    if "cuda" in result["test_accuracy"]:  # a machine with a usable GPU: both answer alike
        assert result["different_predictions"] <= 2 and result["max_probability_difference"] < 1e-2
    else:
        assert "could not start CUDAExecutionProvider" in result["cuda_error"]
        assert set(result["median_ms"]) == {"cpu"}
