"""The shipped models on ONNX Runtime's CPU and CUDA providers, through the service's own session code.

    .venv/bin/python -m benchmarks.ort_devices                      # every model in exported/
    .venv/bin/python -m benchmarks.ort_devices --models mnist-cnn --json /tmp/ort.json

For each model: which provider `service.inference.runtime.create_session` really got for MNIST_DEVICE=cuda
(`get_available_providers()` lists CUDA even where it cannot start), whether the CUDA session's answers match the
CPU's on the 10,000 MNIST test digits (largest probability difference, same predictions, test accuracy), and the
time of one `run` per batch size on each provider (median, from host arrays to host arrays: what the service pays,
copies included). On a machine without a usable GPU it says so and times the CPU alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.inference.runtime import ModelError, create_session
from training.data import given_dir, load_arrays
from training.evaluate import onnx_probabilities

EXPORTED = Path(__file__).resolve().parent.parent / "exported"
BATCHES = (1, 8, 64, 512, 4096)


def time_runs(session: ort.InferenceSession, pixels: np.ndarray, seconds: float = 0.5) -> float:
    """Median seconds of one run on `pixels`, after warm-up runs, over at least `seconds` (and 20 runs)."""
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: pixels})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {name: pixels})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(path: Path, images: np.ndarray, labels: np.ndarray, threads: int) -> dict:
    """One model on each provider that starts. Returns {"model", "test_accuracy": {device: fraction},
    "median_ms": {device: {batch: ms}}, and either "cuda_providers", "max_probability_difference" and
    "different_predictions", or "cuda_error" (the service's own message)}; images uint8 [N, 28, 28]."""
    cpu = create_session(path, "cpu", threads)
    sessions = {"cpu": cpu}
    result: dict = {"model": path.stem}
    try:
        cuda = create_session(path, "cuda", threads)
        sessions["cuda"] = cuda
        result["cuda_providers"] = cuda.get_providers()
    except ModelError as exc:
        result["cuda_error"] = str(exc)
    answers = {device: onnx_probabilities(s, images) for device, s in sessions.items()}
    pixels = images[:, None].astype(np.float32) / 255.0  # what the graph takes (training/export.py)
    result["test_accuracy"] = {d: float((p.argmax(1) == labels).mean()) for d, p in answers.items()}
    if "cuda" in answers:
        result["max_probability_difference"] = float(np.abs(answers["cuda"] - answers["cpu"]).max())
        result["different_predictions"] = int((answers["cuda"].argmax(1) != answers["cpu"].argmax(1)).sum())
    result["median_ms"] = {
        d: {str(b): 1000 * time_runs(s, np.ascontiguousarray(pixels[:b])) for b in BATCHES} for d, s in sessions.items()
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="names in exported/ (default: every .onnx there)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per session (default: all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    arrays = load_arrays(given_dir())  # MNIST_DATA_DIR, as `python -m training` reads it
    images = arrays["t10k-images-idx3-ubyte"]
    labels = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    names = args.models or sorted(f.stem for f in EXPORTED.glob("*.onnx"))
    print(f"onnxruntime {ort.__version__}, available providers {ort.get_available_providers()}")
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores; CPU sessions use {args.threads} threads")
    results = []
    for name in names:
        r = measure(EXPORTED / f"{name}.onnx", images, labels, args.threads)
        results.append(r)
        acc = ", ".join(f"{d} {100 * a:.2f}%" for d, a in r["test_accuracy"].items())
        print(f"\n{name}: test accuracy {acc}")
        if "cuda_error" in r:
            print(f"  CUDA: {r['cuda_error']}")
        else:
            print(f"  CUDA session providers: {r['cuda_providers']}")
            print(
                f"  CUDA vs CPU: largest probability difference {r['max_probability_difference']:.2e}, "
                f"{r['different_predictions']} different predictions"
            )
        print(f"  {'batch':>6} " + " ".join(f"{d + ' ms':>10} {d + ' img/s':>12}" for d in r["median_ms"]))
        for b in BATCHES:
            row = [(r["median_ms"][d][str(b)], b / r["median_ms"][d][str(b)] * 1000) for d in r["median_ms"]]
            print(f"  {b:>6} " + " ".join(f"{ms:>10.3f} {ips:>12,.0f}" for ms, ips in row))
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
