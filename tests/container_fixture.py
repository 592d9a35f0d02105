"""The service image, built once per test session for every test file that runs it (test_container.py,
test_kube.py, test_siblings.py): a pytest plugin, named in those files' `pytest_plugins`, so that its session
fixtures are one fixture, not one per importing module (which would build the image once per file).

The image is built by scripts/container.sh, what `make container` runs. CI machines have Podman but no Docker engine
and no image registry, so the script takes the Debian base from deploy/local-base.sh (debootstrap, cached under
.cache/container) and points the bento's `docker.base_image` at it; every other build setting is bentofile.yaml's.
Needs root, podman, runc and debootstrap (`make sysdeps`): without them the tests fail in CI and are skipped
elsewhere, saying what is missing.

PYTEST_DONT_REWRITE: the test files import `run` from here before pytest loads it as a plugin, too late to rewrite
its asserts (pytest would warn at every run); its one assert needs no rewriting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/mnist-service:test"


def run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    """Run `cmd`; on failure, fail the test with the end of its output (builds are long-winded)."""
    try:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{str(exc.stdout)[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-5000:]}")
    return done.stdout


def fail_or_skip(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI the container tests must run, never quietly skip
    pytest.skip(message)


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        fail_or_skip(f"missing {', '.join(missing)}: run `make sysdeps` (as root)")
    if os.geteuid() != 0:
        fail_or_skip("the container tests need root (debootstrap and rootful Podman)")
    return {
        **os.environ,
        "CONTAINERS_CONF": str(REPO / "deploy" / "containers.conf"),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),  # keep ~/bentoml untouched
        "BENTOML_DO_NOT_TRACK": "true",
    }


@pytest.fixture(scope="session")
def image(podman_env: dict[str, str]) -> str:
    started = time.monotonic()
    env = {**podman_env, "IMAGE": IMAGE, "BACKEND": "podman", "VENV_BIN": str(Path(sys.executable).parent)}
    out = run(["bash", "scripts/container.sh"], env, timeout=900)
    assert f"built {IMAGE}" in out and "podman run --rm -p 3000:3000" in out, out[-2000:]
    print(f"\nbase image, bento and image build: {time.monotonic() - started:.0f} s")  # shown with -s
    return IMAGE
