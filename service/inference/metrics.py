"""Prometheus metrics of the service, served by BentoML's /metrics next to its own request metrics.

prometheus_client is imported on first use, never at module import: BentoML sets PROMETHEUS_MULTIPROC_DIR
in each worker after importing the service module, and a client imported before that would count in
single-process mode, invisible to /metrics.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

# Seconds. Preprocessing a small PNG takes ~0.1-1 ms, a 4 k photo ~100 ms; inference ~0.1 ms per image.
PREPROCESS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
READ_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
INFERENCE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


@dataclass(frozen=True)
class Metrics:
    predictions: Any  # Counter: answers given, by model, version and predicted digit
    preprocess_seconds: Any  # Histogram: one image, bytes -> 28x28
    inference_seconds: Any  # Histogram: one ONNX Runtime call (a whole batch), by model and version
    read_digits: Any  # Histogram: digits found on one /read image


_metrics: Metrics | None = None
_creating = threading.Lock()


def metrics() -> Metrics:
    """The process's metric objects, created once (prometheus_client refuses duplicate names).

    Under a lock: the first requests reach here at once from the event loop (small images) and from worker threads
    (the rest), and `functools.cache` let two of them both create the objects: the second got DuplicateTimeseries,
    a 500 on a fresh server.
    """
    global _metrics
    if _metrics is None:
        with _creating:
            if _metrics is None:
                _metrics = _create()
    return _metrics


def _create() -> Metrics:
    from prometheus_client import Counter, Histogram

    return Metrics(
        predictions=Counter(
            "mnist_predictions",
            "Digits predicted, by model, version and digit",
            labelnames=("model", "version", "digit"),
        ),
        preprocess_seconds=Histogram(
            "mnist_preprocess_seconds",
            "Time to decode and normalise one uploaded image",
            buckets=PREPROCESS_BUCKETS,
        ),
        inference_seconds=Histogram(
            "mnist_inference_seconds",
            "Time of one ONNX Runtime call (one or more images)",
            labelnames=("model", "version"),
            buckets=INFERENCE_BUCKETS,
        ),
        read_digits=Histogram(
            "mnist_read_digits",
            "Digits found on one image sent to /read",
            buckets=READ_BUCKETS,
        ),
    )


# The labelled series of one model (and digit), looked up once: prometheus_client's `labels()` takes a lock and
# builds a key on every call, and these are counted on every answer. Two threads missing the cache at once both get
# the same series from `labels()`, so the cache needs no lock of its own.


@functools.cache
def prediction_count(model: str, version: str, label: str) -> Any:
    return metrics().predictions.labels(model, version, label)


@functools.cache
def inference_seconds(model: str, version: str) -> Any:
    return metrics().inference_seconds.labels(model, version)
