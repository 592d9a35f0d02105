"""Shared fixtures: the real exported models, real MNIST test digits, and a real `bentoml serve`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from loadtest.server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The models the service ships; MNIST_EXPORTED_DIR points elsewhere (as it does for the service).
EXPORTED = Path(os.environ.get("MNIST_EXPORTED_DIR", REPO_ROOT / "exported"))
BENTOML = Path(sys.executable).with_name("bentoml")
START_TIMEOUT_S = 60
# Small enough that the over-limit tests upload little, large enough for every legitimate test upload.
TEST_MAX_BYTES = 2_000_000


@dataclass(frozen=True)
class Digit:
    name: str
    png: bytes
    label: int
    pixels: np.ndarray  # float32 (28, 28) in [0, 1]: the PNG's pixels / 255


def model_file(name: str) -> Path:
    path = EXPORTED / f"{name}.onnx"
    if not path.is_file():
        pytest.fail(f"{path} is missing: train and export the models first (`make train export`)")
    return path


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    return model_file("mnist-cnn")


@pytest.fixture(scope="session")
def mnist_digits() -> list[Digit]:
    """The 100 MNIST test digits in tests/fixtures/mnist_digits (see the README there)."""
    folder = FIXTURES / "mnist_digits"
    digits = []
    for row in json.loads((folder / "labels.json").read_text()):
        png = (folder / row["file"]).read_bytes()
        pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / np.float32(255)
        digits.append(Digit(row["file"], png, int(row["label"]), pixels))
    return digits


@dataclass(frozen=True)
class Server:
    url: str
    models: tuple[str, ...]
    startup_s: float
    log: Path


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`bentoml serve` from the repository root on a free port, with every shipped model loaded."""
    yield from serve(tmp_path_factory.mktemp("server") / "bentoml.log")


def serve(log: Path, **env_overrides: str) -> Iterator[Server]:
    """A `bentoml serve` as `server` starts it, with these MNIST_* settings changed; yields it, then stops it.

    Each server has a BENTOML_HOME of its own, next to its log: every `bentoml serve` empties its home's Prometheus
    folder when it starts, so a server started later from a shared home would wipe this one's counters (and this
    one's /metrics would then show the other's).
    """
    models = tuple(name for name in ("mnist-cnn", "mnist-mlp") if (EXPORTED / f"{name}.onnx").is_file())
    model_file("mnist-cnn")
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-", dir=log.parent),
        "MNIST_EXPORTED_DIR": str(EXPORTED),
        "MNIST_MODELS": ",".join(models),
        "MNIST_WORKERS": "2",
        "MNIST_MAX_BYTES": str(TEST_MAX_BYTES),
        **env_overrides,
    }
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BENTOML), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its workers too
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail(f"bentoml serve not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            try:
                # /readyz answers from whichever worker is up first; the tests want every worker serving (each
                # logs "worker N ready" once its models are served).
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200 and workers_ready(log) >= int(
                    env["MNIST_WORKERS"]
                ):
                    break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.1)
        yield Server(url, models, time.monotonic() - start, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def workers_ready(log: Path) -> int:
    """How many workers of the server writing `log` have logged that they serve their models."""
    return len(set(re.findall(r"\] worker (\d+) ready: ", log.read_text(errors="replace"))))


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of metric `name` (a whole series name: `mnist_read_digits_count`) over the series of the server's
    /metrics whose labels include `labels`; 0 when there is none."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# Slow (docs/development.md, "Tests"): anything that starts a server, trains, exports, drives a browser or a container,
# or loads a server. Marked in their files; here, the tests of files that are not marked as a whole: every test that
# uses a `server` fixture (a real `bentoml serve`), and the files that train a model.
SLOW_FIXTURES = ("server",)
SLOW_FILES = {"test_train.py": "trains models", "test_export.py": "trains and exports a model"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES or any(name in SLOW_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
