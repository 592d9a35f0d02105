"""The service image really runs: built by scripts/container.sh, what `make container` runs (once per session:
container_fixture.py), then one container started as the README shows it (`CONTAINERS_CONF=deploy/containers.conf
podman run ...`), asked for real MNIST digits at the port and paths Kubernetes would use, and stopped.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import yaml
from container_fixture import REPO, run
from mnist_fixture import candidate_dirs, mnist_test
from PIL import Image

from loadtest.server import free_port

pytestmark = pytest.mark.slow
pytest_plugins = ("container_fixture",)  # the session's image and Podman environment

BENTO_SRC = "/home/bentoml/bento/src"  # where BentoML's Dockerfile puts the packaged files
# Today's image is ~1.35 GB (onnxruntime-gpu 340 MB, BentoML's build-essential layer ~250 MB); torch or
# training data sneaking in would push it well past this.
IMAGE_BUDGET_BYTES = 1_600_000_000
READY_TIMEOUT_S = 120
DIGITS = 20  # the first test digits; all ten classes appear among them
# Configuration reaches the service in the container through the environment (docs/api.md, "Settings").
CONTAINER_ENV = {"MNIST_MODELS": "mnist-cnn,mnist-mlp", "MNIST_DEVICE": "auto", "MNIST_THREADS": "2"}


def probe_paths() -> dict[str, str]:
    """{"livenessProbe": path, "readinessProbe": path} from deploy/k8s's base Deployment."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {probe: container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")}


@pytest.fixture(scope="module")
def container(image: str, podman_env: dict[str, str]) -> Iterator[str]:
    """Base URL of a running container of `image`, once it answers its readiness probe."""
    name = f"mnist-container-test-{os.getpid()}"
    port = free_port()
    publish = f"127.0.0.1:{port}:3000"  # loopback only: nothing else on the machine sees the test service
    env = [f"--env={key}={value}" for key, value in CONTAINER_ENV.items()]
    # No --rm: a container that dies at start-up must keep its logs for the failure message.
    run(["podman", "run", "-d", "--name", name, "-p", publish, *env, image], podman_env, timeout=60)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            try:
                if requests.get(url + probe_paths()["readinessProbe"], timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or accepted while the worker still loads: ask again
            state = subprocess.run(
                ["podman", "inspect", "-f", "{{.State.Running}}", name],
                env=podman_env, capture_output=True, text=True, check=False,
            ).stdout.strip()  # fmt: skip
            if state != "true" or time.monotonic() - started > READY_TIMEOUT_S:
                logs = subprocess.run(["podman", "logs", name], env=podman_env, capture_output=True, text=True)
                pytest.fail(f"container not ready (running={state or 'gone'}):\n{(logs.stdout + logs.stderr)[-4000:]}")
            time.sleep(0.5)
        print(f"\ncontainer ready {time.monotonic() - started:.1f} s after `podman run`")
        yield url
    finally:
        for cleanup in (["podman", "stop", "-t", "10", name], ["podman", "rm", "-f", name]):
            subprocess.run(cleanup, env=podman_env, capture_output=True, check=False)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_container_reads_real_digits(container: str) -> None:
    data = mnist_test()
    if data is None:
        pytest.fail(f"MNIST test files not found in {[str(d) for d in candidate_dirs()]}; run `make data`")
    images, labels = data
    answers = []
    for pixels in images[:DIGITS]:
        reply = requests.post(
            f"{container}/predict", files={"image": ("digit.png", png(pixels), "image/png")}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    digits = [answer["digit"] for answer in answers]
    wrong = sum(d != int(label) for d, label in zip(digits, labels[:DIGITS], strict=True))
    assert wrong <= 1, f"container answered {digits} for {labels[:DIGITS].tolist()}"
    first = answers[0]
    assert len(first["probabilities"]) == 10 and abs(sum(first["probabilities"]) - 1) < 1e-4
    assert first["model"] and first["version"]


def test_container_takes_its_configuration_from_the_environment(container: str) -> None:
    cards = requests.get(f"{container}/model", timeout=10).json()
    wanted = CONTAINER_ENV["MNIST_MODELS"].split(",")
    assert cards["default"] == wanted[0]
    assert [card["name"] for card in cards["models"]] == wanted
    # CPU here; with the GPU image and --gpus all this would be CUDAExecutionProvider.
    assert {card["provider"] for card in cards["models"]} <= {"CPUExecutionProvider", "CUDAExecutionProvider"}


def test_container_rejects_a_non_image_with_json(container: str) -> None:
    reply = requests.post(f"{container}/predict", files={"image": ("x.png", b"not an image", "image/png")}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert "error" in reply.json()


def test_container_answers_the_kubernetes_probes(container: str) -> None:
    for probe, path in probe_paths().items():
        assert requests.get(container + path, timeout=5).status_code == 200, f"{probe} {path}"


def test_image_holds_serving_code_only(image: str, podman_env: dict[str, str]) -> None:
    check = (
        "import importlib.metadata as m, importlib.util as u, json, os; "
        "dists = {d.metadata['Name'].lower() for d in m.distributions()}; "
        f"print(json.dumps({{'dists': sorted(dists), 'src': sorted(os.listdir('{BENTO_SRC}')), "
        "'modules': [n for n in ('torch', 'torchvision', 'onnx', 'training') if u.find_spec(n)]}))"
    )
    out = run(["podman", "run", "--rm", "--entrypoint", "python", image, "-c", check], podman_env, timeout=60)
    found = json.loads(out.strip().splitlines()[-1])
    assert found["modules"] == [], "training-side packages in the serving image"
    assert "onnxruntime-gpu" in found["dists"] and "onnxruntime" not in found["dists"], found["dists"]
    assert {"service", "exported"} <= set(found["src"]), found["src"]
    assert not {"training", "data", "runs", "tests"} & set(found["src"]), found["src"]


def test_image_size_within_budget(image: str, podman_env: dict[str, str]) -> None:
    size = int(run(["podman", "image", "inspect", "-f", "{{.Size}}", image], podman_env, timeout=30))
    print(f"\n{image}: {size / 1e9:.2f} GB")
    assert size < IMAGE_BUDGET_BYTES, f"{image} is {size / 1e9:.2f} GB, over {IMAGE_BUDGET_BYTES / 1e9} GB"
