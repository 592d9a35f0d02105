"""`bentoml serve` at start-up, for real: what it refuses to serve, and what it serves without.

A bad setting stops it, naming the variable (docs/api.md, "Settings"); a model without its metadata, or
MNIST_DEVICE=cuda without CUDA, is never served (docs/api.md, "Process lifecycle"; deploy/README.md, GPU): the
function-level refusals are in test_settings.py and test_runtime.py, these check the server a user starts. And where
/dev/shm is not writable, the workers warn that connections are not balanced and serve all the same (docs/api.md,
"Connections over workers").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from conftest import EXPORTED, REPO_ROOT, Digit
from test_runtime import NO_GPU, edited_copy

from loadtest.server import LocalServer, free_port

pytestmark = pytest.mark.slow  # real servers

BENTOML = Path(sys.executable).with_name("bentoml")
LIMIT_S = 60  # to name the problem; a bound, not a speed target (it takes 1-3 s)


def start(log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` from the repository root with `env` (and a BENTOML_HOME of its own), on a free port."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="bentoml-home-", dir=log.parent)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BENTOML), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env={**os.environ, "BENTOML_HOME": home, "MNIST_WORKERS": "2", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_bad_setting_stops_the_server_naming_it(tmp_path: Path) -> None:
    process, _ = start(tmp_path / "bentoml.log", {"MNIST_THREADS": "zero"})
    try:
        assert process.wait(timeout=LIMIT_S) != 0
    finally:
        stop(process)
    assert "MNIST_THREADS='zero' is not an integer" in (tmp_path / "bentoml.log").read_text(errors="replace")


def never_served(log: Path, env: dict[str, str], problem: str) -> None:
    """The server is never ready and answers no request, its log names `problem`, and `bentoml serve` stops (BentoML
    1.4 alone would restart the failing workers for ever: the worker asks its supervisor to stop)."""
    process, url = start(log, env)
    try:
        deadline = time.monotonic() + LIMIT_S
        while problem not in log.read_text(errors="replace"):
            assert not ready(url), "the server became ready"
            assert time.monotonic() < deadline, f"not named within {LIMIT_S} s: {problem}"
            if process.poll() is not None:
                break
            time.sleep(0.2)
        assert problem in log.read_text(errors="replace")
        for _ in range(3):  # a while longer (each try waits up to 1 s): the workers that restart fail again
            assert not ready(url), "the server became ready"
        digit = (Path(__file__).parent / "fixtures" / "mnist_digits" / "t10k-0000.png").read_bytes()
        with pytest.raises(requests.RequestException):  # no answer, or an error
            answer = requests.post(f"{url}/predict", files={"image": ("d.png", digit)}, timeout=2)
            answer.raise_for_status()
        process.wait(timeout=LIMIT_S)  # TimeoutExpired: still running, restarting its workers
        assert "cannot serve" in log.read_text(errors="replace")
    finally:
        stop(process)


def test_a_model_without_its_metadata_is_never_served(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    edited_copy(EXPORTED / "mnist-cnn.onnx", models / "mnist-cnn.onnx", drop=("labels", "input_polarity"))
    env = {"MNIST_EXPORTED_DIR": str(models), "MNIST_MODELS": "mnist-cnn"}
    never_served(tmp_path / "bentoml.log", env, "lacks required metadata: input_polarity, labels")


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_never_served(tmp_path: Path) -> None:
    env = {"MNIST_DEVICE": "cuda", "MNIST_MODELS": "mnist-cnn"}
    never_served(tmp_path / "bentoml.log", env, "MNIST_DEVICE=cuda, but ONNX Runtime could not start")


def can_mount_over_dev_shm() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "ro", "tmpfs", "/dev/shm"]).returncode == 0


def read_answer(client: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the next answer on a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        body += client.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_without_a_writable_dev_shm_the_workers_warn_and_serve(tmp_path: Path, mnist_digits: list[Digit]) -> None:
    """The connection table cannot be made (its own mount namespace, /dev/shm a read-only tmpfs): each worker that
    tries says so once, and the workers take turns; every request is answered."""
    if not can_mount_over_dev_shm():
        message = "needs `unshare -m` and mount (root): /dev/shm made read-only for one server"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs as root: there it must run
        pytest.skip(message)
    serve = f"mount -t tmpfs -o ro tmpfs /dev/shm && exec {BENTOML} serve --host 127.0.0.1 --port {{port}}"
    log = tmp_path / "bentoml.log"
    env = {"MNIST_WORKERS": "2", "MNIST_EXPORTED_DIR": str(EXPORTED), "MNIST_MODELS": "mnist-cnn"}
    with LocalServer(env=env, log_path=log, command=["unshare", "-m", "sh", "-c", serve]) as server:
        clients = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(16)]
        try:
            for client, digit in zip(clients, mnist_digits, strict=False):  # one keep-alive connection each
                head = (
                    f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                    f"Content-Length: {len(digit.png)}\r\n\r\n"
                )
                client.sendall(head.encode() + digit.png)
            answers = [read_answer(client) for client in clients]
        finally:
            for client in clients:
                client.close()
    assert all(status == 200 for status, _ in answers), answers
    right = sum(body["digit"] == digit.label for (_, body), digit in zip(answers, mnist_digits, strict=False))
    assert right >= 15, answers
    warnings = [line for line in log.read_text(errors="replace").splitlines() if "are not balanced" in line]
    assert 1 <= len(warnings) <= 2, warnings  # once per worker that accepted, at most
    assert all("no shared table" in line and "Read-only file system" in line for line in warnings), warnings
