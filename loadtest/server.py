"""A local `bentoml serve` under test: start it on a free port, time its start-up, watch its processes, stop it.

Memory and CPU are read with psutil from the server's process tree: BentoML's supervisor process plus one
`_bentoml_impl.worker.service` process per worker (MNIST_WORKERS); the workers are where the models live.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
WORKER_MARK = "_bentoml_impl.worker.service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    role: str  # "supervisor" or "worker"
    rss: int  # bytes
    cpu_seconds: float  # user + system since the process started


class LocalServer:
    """`bentoml serve` from the repository root with extra environment `env`, on 127.0.0.1:`port`.

    Use as a context manager; `startup_seconds` is the time from launch until GET /readyz answers 200.
    The server runs in its own session so that stopping it ends exactly its process group.

    Unless `env` names one, each server gets a BENTOML_HOME of its own (a temporary folder, removed at `stop()`):
    every `bentoml serve` empties its home's Prometheus folder when it starts, so two servers sharing a home would
    wipe and mix each other's metrics.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        command: list[str] | None = None,
    ):
        """`command` (with `{port}` in it) runs another server instead, e.g. a benchmark baseline; every
        process it starts then counts as a worker."""
        self.env = {**os.environ, **(env or {})}
        self.own_home = "BENTOML_HOME" not in (env or {})  # even when this process's environment has one
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [part.replace("{port}", str(self.port)) for part in command] if command else None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._home: str | None = None  # the BENTOML_HOME made for this server, if `env` named none

    def start(self, timeout: float = 120.0) -> LocalServer:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        bentoml = Path(sys.executable).with_name("bentoml")
        env = self.env
        if self.own_home:
            self._home = tempfile.mkdtemp(prefix="bentoml-home-")
            env = {**env, "BENTOML_HOME": self._home}
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command or [str(bentoml), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else "(no log kept)"
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited with {code} during start-up:\n{tail}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    self.startup_seconds = time.perf_counter() - started
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready on {self.url} within {timeout:.0f} s")

    @property
    def name(self) -> str:
        return " ".join(self.command[:4]) if self.command else "bentoml serve"

    def processes(self) -> list[tuple[str, psutil.Process]]:
        """(role, process) for the supervisor and each worker, now."""
        assert self.proc is not None, "start() the server first"
        root = psutil.Process(self.proc.pid)
        found = [("supervisor", root)]
        for child in root.children(recursive=True):
            try:
                role = "worker" if self.command or WORKER_MARK in " ".join(child.cmdline()) else "helper"
            except psutil.Error:
                continue
            found.append((role, child))
        return found

    def sample(self) -> list[ProcessSample]:
        out = []
        for role, proc in self.processes():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    out.append(ProcessSample(proc.pid, role, proc.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                continue  # a process that ended between listing and reading
        return out

    def workers(self) -> list[ProcessSample]:
        return [s for s in self.sample() if s.role == "worker"]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session we created: this server and its workers only
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
