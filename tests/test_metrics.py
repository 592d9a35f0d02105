"""service/inference/metrics.py: the metric objects are made once per process, even when the first requests arrive
together on the event loop and in worker threads (a race here answered a fresh server's first burst with a 500)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import EXPORTED, REPO_ROOT, Digit

from loadtest.server import LocalServer

RACE = """
import threading
from service.inference import metrics
barrier = threading.Barrier(32)
errors = []
def first_use():
    barrier.wait()
    try:
        metrics.metrics()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_use) for _ in range(32)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors), errors[:1])
"""


def test_32_threads_making_the_metrics_at_once_all_get_them() -> None:
    for _ in range(5):  # a fresh process each time: the race is on the first use only
        out = subprocess.run([sys.executable, "-c", RACE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("0 "), out.stdout


@pytest.mark.slow
def test_a_fresh_servers_first_burst_gets_no_server_error(tmp_path: Path, mnist_digits: list[Digit]) -> None:
    """32 concurrent first requests, small images (answered on the event loop) and batches (in worker threads),
    right after start-up; three fresh servers."""
    env = {"MNIST_EXPORTED_DIR": str(EXPORTED), "MNIST_MODELS": "mnist-cnn", "MNIST_WORKERS": "2"}
    one = [{"image": (d.name, d.png, "image/png")} for d in mnist_digits[:16]]
    batches = [[("images", (d.name, d.png, "image/png")) for d in mnist_digits[i : i + 4]] for i in range(16)]
    for start in range(3):
        home = {"BENTOML_HOME": str(tmp_path / f"home-{start}")}
        with LocalServer(env={**env, **home}, log_path=tmp_path / f"bentoml-{start}.log") as server:

            def send(i: int, url: str = server.url) -> int:
                path, files = ("/predict", one[i // 2]) if i % 2 == 0 else ("/predict_batch", batches[i // 2])
                return requests.post(f"{url}{path}", files=files, timeout=60).status_code

            with ThreadPoolExecutor(32) as pool:
                statuses = list(pool.map(send, range(32)))
            log = (tmp_path / f"bentoml-{start}.log").read_text(errors="replace")
            assert statuses == [200] * 32, (statuses, log[-3000:])
            assert "DuplicateTimeseries" not in log and "Duplicated timeseries" not in log
