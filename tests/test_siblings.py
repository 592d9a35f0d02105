"""A dead worker is seen (service/http/siblings.py): in a container, the server stops within seconds so that the
orchestrator replaces it; outside one, BentoML respawns the worker as before.

The fast tests check the pieces on a fake /proc, and pin the two things of BentoML and uvicorn the module reads. The
slow ones kill one of two workers with SIGKILL under load, in a real `bentoml serve` (with and without BentoML's
"in a container" variable) and in the real image under Podman; every request in flight must end, answered or with a
clean connection error, and none may wait for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import uvicorn
from bentoml import serving
from conftest import EXPORTED, FIXTURES
from container_fixture import run

from loadtest.server import LocalServer, free_port
from service.http import siblings

pytest_plugins = ("container_fixture",)  # the session's image, shared with test_container.py and test_kube.py

DIGIT = FIXTURES / "mnist_digits" / "t10k-0000.png"  # a 7
# A dead worker is seen within CHECK_S, then the survivor drains (its requests in flight, the listen queue):
# measured 0.6-2.3 s on 2 cores; this bounds it with room for a loaded CI machine.
EXIT_BOUND_S = 10.0
REQUEST_TIMEOUT_S = 15.0  # a request that has no answer and no error by then hangs
WORKERS_ENV = {"MNIST_WORKERS": "2", "MNIST_THREADS": "1", "MNIST_MODELS": "mnist-cnn"}
SERVER_ENV = {**WORKERS_ENV, "MNIST_EXPORTED_DIR": str(EXPORTED)}


# -- the pieces ----------------------------------------------------------------------------------------------


def fake_proc(root: Path, processes: dict[int, tuple[str, int]]) -> Path:
    """A /proc with `processes` {pid: (state, ppid)}; command names with spaces and parentheses, as real ones can."""
    for pid, (state, ppid) in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(f"{pid} (python (w) {pid}) {state} {ppid} 1 1 0 -1 4194560 0\n")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


def test_children_are_read_from_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {1: ("S", 0), 14: ("S", 1), 15: ("Z", 1), 20: ("R", 14)})
    assert siblings.children(1, proc) == {14: "S", 15: "Z"}
    assert siblings.children(14, proc) == {20: "R"}


def test_children_of_this_process_on_the_real_proc() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert siblings.children(os.getpid()).get(child.pid) in ("S", "R")
    finally:
        child.kill()
        child.wait()


def test_a_sibling_is_dead_when_it_is_gone_or_a_zombie() -> None:
    assert siblings.dead_siblings(set(), {14: "S"}) == set()
    assert siblings.dead_siblings({14, 15}, {14: "S", 15: "S"}) == set()
    assert siblings.dead_siblings({14, 15}, {14: "S"}) == {15}  # reaped
    assert siblings.dead_siblings({14, 15}, {14: "S", 15: "Z"}) == {15}  # not reaped
    assert siblings.dead_siblings(set(), {15: "Z"}) == {15}  # died before this worker first looked
    assert siblings.running({14: "S", 15: "Z", 16: "R"}) == {14, 16}


def watch_fake_siblings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopping: Callable[[], bool]
) -> tuple[int | None, list[tuple[int, int]]]:
    """Run `watch` on a fake /proc where this process and a sibling are children of our real parent; the sibling
    dies after a few looks. Returns what watch returned (None: still watching) and the signals it sent."""
    parent, me = os.getppid(), os.getpid()
    proc = fake_proc(tmp_path, {me: ("R", parent), 999_999: ("S", parent)})
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(siblings.os, "kill", lambda pid, sig: sent.append((pid, sig)))

    async def scenario() -> int | None:
        task = asyncio.create_task(siblings.watch(parent, stopping, proc, every_s=0.01))
        await asyncio.sleep(0.05)
        assert not task.done()  # a live sibling is no news
        fake_proc(tmp_path, {999_999: ("Z", parent)})
        await asyncio.sleep(0.1)
        if task.done():
            return task.result()
        task.cancel()
        return None

    return asyncio.run(scenario()), sent


def test_a_dead_sibling_stops_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, sent = watch_fake_siblings(tmp_path, monkeypatch, stopping=lambda: False)
    assert result == 999_999
    assert sent == [(os.getppid(), signal.SIGTERM)]


def test_siblings_exiting_at_a_normal_stop_are_no_news(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, sent = watch_fake_siblings(tmp_path, monkeypatch, stopping=lambda: True)
    assert result is None and sent == []


def test_the_watch_runs_only_in_a_serving_worker_with_siblings_in_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    async def started(inside: bool, workers: int, worker_index: int | None) -> bool:
        monkeypatch.setattr(siblings, "running_inside_container", lambda: inside)
        task = siblings.start(asyncio.get_running_loop(), workers, worker_index)
        if task is None:
            return False
        task.cancel()
        return True

    assert asyncio.run(started(True, 2, 1))
    assert not asyncio.run(started(False, 2, 1))  # BentoML respawns
    assert not asyncio.run(started(True, 1, 1))  # no sibling
    assert not asyncio.run(started(True, 2, None))  # a script or test that makes the service class


def test_bentoml_respawns_workers_only_outside_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: what siblings.py relies on (bentoml/serving.py in BentoML 1.4). If this fails after an upgrade, see
    whether BentoML now restarts workers in a container, or decides it another way, and follow it in siblings.py."""
    monkeypatch.delenv("BENTOCLOUD_DEPLOYMENT_URL", raising=False)
    for containerized in (False, True):
        if containerized:
            monkeypatch.setenv("BENTOML_CONTAINERIZED", "true")
        else:
            monkeypatch.delenv("BENTOML_CONTAINERIZED", raising=False)
        serving.running_inside_container.cache_clear()
        try:
            assert siblings.running_inside_container() is containerized
            assert serving.create_watcher("guard", ["-c", "pass"]).respawn is not containerized
        finally:
            serving.running_inside_container.cache_clear()


def test_a_stopping_uvicorn_server_is_seen() -> None:
    """Guard: uvicorn's Server is the SIGTERM handler while it serves (capture_signals), with `should_exit`."""
    server = uvicorn.Server(uvicorn.Config(app=None))
    assert not siblings.server_stopping()()  # no server: never stopping
    with server.capture_signals():
        stopping = siblings.server_stopping()
        assert not stopping()
        server.should_exit = True
        assert stopping()


# -- a real `bentoml serve` --------------------------------------------------------------------------------------


def under_load(url: str, until: Callable[[], bool]) -> list[str]:
    """Two clients posting a digit, a new connection each, until `until()`; every outcome: "answered", or the name of
    the connection error. A request with neither within REQUEST_TIMEOUT_S is a hang, and fails the test."""
    outcomes: list[str] = []
    body = DIGIT.read_bytes()

    def client() -> None:
        while not until():
            try:
                reply = requests.post(
                    f"{url}/predict", files={"image": ("d.png", body, "image/png")}, timeout=REQUEST_TIMEOUT_S
                )
                outcomes.append("answered" if reply.status_code == 200 and reply.json()["digit"] == 7 else reply.text)
            except requests.Timeout:
                outcomes.append("hung")
                return
            except requests.ConnectionError as exc:
                outcomes.append(type(exc).__name__)
                time.sleep(0.01)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(client) for _ in range(2)]:
            future.result(timeout=REQUEST_TIMEOUT_S + EXIT_BOUND_S + 30)
    return outcomes


def check_outcomes(outcomes: list[str]) -> None:
    assert "hung" not in outcomes, outcomes
    assert outcomes.count("answered") > 0
    assert set(outcomes) <= {"answered", "ConnectionError"}, outcomes


@pytest.fixture
def local_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalServer]:
    server = LocalServer(env={**SERVER_ENV, **request.param}, log_path=tmp_path / "bentoml.log").start()
    try:
        yield server
    finally:
        server.stop()


def workers_of(server: LocalServer) -> list[psutil.Process]:
    return [p for role, p in server.processes() if role == "worker" and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.parametrize("local_server", [{"BENTOML_CONTAINERIZED": "true"}], indirect=True)
def test_in_a_container_a_killed_worker_stops_the_server(local_server: LocalServer) -> None:
    server = local_server
    assert server.proc is not None
    proc = server.proc
    ended: list[float] = []

    def kill_then_wait() -> None:
        time.sleep(0.5)  # some answers first
        workers_of(server)[0].kill()
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=EXIT_BOUND_S)
        ended.append(time.monotonic() - started if proc.poll() is not None else float("inf"))

    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(kill_then_wait)
        outcomes = under_load(server.url, until=lambda: proc.poll() is not None or not watcher.running())
        watcher.result()
    print(f"\nbentoml serve exited {ended[0]:.2f} s after one of its 2 workers was killed; outcomes {set(outcomes)}")
    assert ended[0] < EXIT_BOUND_S, f"bentoml serve still runs {EXIT_BOUND_S} s after a worker was killed"
    check_outcomes(outcomes)
    log = server.log_path.read_text() if server.log_path else ""
    assert "died and BentoML does not restart workers in a container" in log


@pytest.mark.slow
@pytest.mark.parametrize("local_server", [{"BENTOML_CONTAINERIZED": "true"}], indirect=True)
def test_in_a_container_a_normal_stop_reports_no_dead_worker(local_server: LocalServer) -> None:
    assert local_server.proc is not None
    local_server.proc.send_signal(signal.SIGTERM)
    assert local_server.proc.wait(timeout=30) == 0
    log = local_server.log_path.read_text() if local_server.log_path else ""
    assert "died" not in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("local_server", [{}], indirect=True)
def test_outside_a_container_bentoml_respawns_a_killed_worker(local_server: LocalServer) -> None:
    server = local_server
    before = workers_of(server)
    assert len(before) == 2
    before[0].kill()
    deadline = time.monotonic() + EXIT_BOUND_S
    while time.monotonic() < deadline:
        now = workers_of(server)
        if len(now) == 2 and before[0].pid not in {p.pid for p in now}:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no worker replaced the killed one in {EXIT_BOUND_S} s")
    assert server.proc is not None and server.proc.poll() is None
    for _ in range(10):  # the new worker serves too: with 2 workers, 10 new connections reach both
        reply = requests.post(
            f"{server.url}/predict", files={"image": ("d.png", DIGIT.read_bytes(), "image/png")}, timeout=30
        )
        assert reply.status_code == 200 and reply.json()["digit"] == 7, reply.text
    log = server.log_path.read_text() if server.log_path else ""
    assert "died" not in log


# -- the real image ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_in_the_image_a_killed_worker_ends_the_container(image: str, podman_env: dict[str, str]) -> None:
    """What an operator saw (a worker killed, /livez and /readyz still 200, half the capacity for ever), in the real
    image: now the container ends within EXIT_BOUND_S, and a restart policy or Kubernetes replaces it."""
    name = f"mnist-siblings-test-{os.getpid()}"
    port = free_port()
    env = [f"--env={key}={value}" for key, value in WORKERS_ENV.items()]
    run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", *env, image], podman_env, timeout=60)
    url = f"http://127.0.0.1:{port}"

    def podman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=podman_env, capture_output=True, text=True, check=False)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, podman("logs", name).stderr[-3000:]
            time.sleep(0.3)
        # bentoml serve is the container's pid 1; its children are the two workers. The image has no `kill` binary,
        # but has sh's.
        workers = podman("exec", name, "cat", "/proc/1/task/1/children").stdout.split()
        assert len(workers) == 2, workers
        ended: list[float] = []

        def kill_then_wait() -> None:
            time.sleep(0.5)  # some answers first
            killed = podman("exec", name, "sh", "-c", f"kill -9 {workers[0]}")
            assert killed.returncode == 0, killed.stderr
            started = time.monotonic()
            while time.monotonic() - started < EXIT_BOUND_S:
                if podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
                    ended.append(time.monotonic() - started)
                    return
                time.sleep(0.1)
            ended.append(float("inf"))

        with ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(kill_then_wait)
            outcomes = under_load(url, until=lambda: not watcher.running())
            watcher.result()
        print(f"\ncontainer ended {ended[0]:.2f} s after one of its 2 workers was killed; outcomes {set(outcomes)}")
        logs = podman("logs", name)
        assert ended[0] < EXIT_BOUND_S, f"container still runs {EXIT_BOUND_S} s after a worker was killed"
        check_outcomes(outcomes)
        assert "died and BentoML does not restart workers in a container" in logs.stdout + logs.stderr
    finally:
        podman("rm", "-f", name)
