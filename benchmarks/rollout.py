"""A rolling update through a real load balancer under steady load, every request counted (issue 29, item 4).

    .venv/bin/python -m benchmarks.rollout                   # = make rollout; prints the figures
    .venv/bin/python -m benchmarks.rollout --plain-haproxy   # the same without the retry options, to compare

What Kubernetes does to a Deployment of two replicas with `maxSurge: 1, maxUnavailable: 0` when its image changes,
played with real processes on one machine (docs/kubernetes.md, "Rolling update (measured)"):

- a pod is one `bentoml serve` (loadtest/server.py's LocalServer: its own port and BENTOML_HOME), MNIST_WORKERS=1,
  serving mnist-cnn;
- the Service's endpoints are HAProxy's (Debian's package) server slots, in HTTP mode: each checked with GET
  /readyz as the readiness probe does, every 0.5 s, out after 2 failures, in after 2 successes;
- the load is Locust, headless, loadtest/locustfile.py's uploaders through HAProxy; loadtest/rollout_locustfile.py
  tallies every request: its outcome (a reset connection apart from any other failure) and the version that
  answered.

Each replacement is what the Deployment controller and the kubelet do:

1. a new pod starts, serving a NEW version (the shipped CNN with another `version` in its ONNX metadata, with
   verification-digits.npz and models.json in a temporary MNIST_EXPORTED_DIR) in a free slot, which takes traffic
   once HAProxy's own checks pass (Ready: the pod joins the endpoints);
2. the old pod is deleted: its endpoint is removed (HAProxy's runtime API, `set server replicas/rN state drain`:
   no new request goes to it, those in flight finish) and its preStop hook runs (a sleep of --prestop seconds);
3. then SIGTERM to the pod's main process, `bentoml serve` (PID 1 in the container; not its process group), which
   drains (service/http/patches.py, "Graceful drain") and exits; SIGKILL if it is still there after --grace.

Printed: requests, failures by kind, resets, answers per version, HAProxy's retries and redispatches (what it
absorbed), per replacement the new pod's start to /readyz 200 and to HAProxy's UP, and the old pod's drain (SIGTERM
to exit), and the latency (p50, p99, max) over the whole run and during the replacements. Exit status 0 only with
no failed request, no reset, both versions answering and every old pod gone within the grace period.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from loadtest.server import REPO, LocalServer, free_port

MODEL = "mnist-cnn"
LOCUSTFILE = REPO / "loadtest" / "rollout_locustfile.py"
RESULTS = REPO / "loadtest" / "results"
# One pod: one worker serving one model, so that three pods (two and the surge) share the machine's cores.
POD_ENV = {"MNIST_MODELS": MODEL, "MNIST_WORKERS": "1", "BENTOML_DO_NOT_TRACK": "true"}
CHECK_INTERVAL_S = 0.5
# HAProxy's runtime API, polled for a server's state while a pod starts or drains.
POLL_S = 0.02

# The load balancer. Every line that is not HAProxy's default is there for a reason:
# - `tune.bufsize`: a request is retried only if all of it is still in HAProxy's buffer; the largest request here,
#   a 64-digit /predict_batch, is ~27 KB, over the default 16 KB (`option http-buffer-request` waits for it whole);
# - the health check is the readiness probe's (GET /readyz, 200), at a short interval, with `fall`/`rise` of 2;
# - `http-reuse safe` (the default, said aloud): a client's first request gets a connection of its own, later ones
#   may reuse an idle connection to the server, which the server may be closing at that moment (its keep-alive
#   timeout, MNIST_KEEPALIVE_TIMEOUT_S, or its drain at SIGTERM);
# - RETRIES: see the constant below.
HAPROXY_CFG = """\
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 info
    tune.bufsize 65536

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
{retries}
frontend mnist
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    http-reuse safe
    option http-buffer-request
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter {inter_ms}ms fall 2 rise 2
{servers}
"""
# What zero failures needs from the proxy: a request that went out on an idle keep-alive connection the server was
# closing at that instant comes back with nothing ("empty-response") and is sent again, to another replica
# ("redispatch"); so is one whose connection was refused ("conn-failure": a server that stopped listening). Both are
# safe here: every route of the service is a pure function of its request, so answering one twice changes nothing.
# No "response-timeout": a slow answer is not retried (it would double the work exactly when a server is busiest).
RETRIES = """\
    retries 3
    retry-on conn-failure empty-response
    option redispatch 1
"""


@dataclass
class Replacement:
    old: str  # slot of the pod that was replaced
    new: str  # slot of the pod that replaced it
    new_version: str
    ready_s: float = 0.0  # new pod: start to GET /readyz 200
    up_s: float = 0.0  # new pod: start to HAProxy's check marking it UP (in the endpoints)
    in_flight_at_removal: int = 0  # old pod: requests HAProxy had in progress on it at its removal
    in_flight_at_sigterm: int = 0  # ... and once the preStop delay had passed
    drain_s: float = 0.0  # old pod: SIGTERM to the exit of `bentoml serve`
    killed: bool = False  # old pod: still there after the grace period (SIGKILL)
    window: tuple[float, float] = (0.0, 0.0)  # epoch seconds: new pod started, old pod gone


@dataclass
class Rollout:
    users: int
    prestop_s: float
    retries: bool
    removal: bool  # the endpoint removed before SIGTERM (False: HAProxy finds out from its checks alone)
    seconds: float = 0.0
    requests: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # outcome -> count, "ok" apart
    examples: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # version -> answers that carried it
    no_version: int = 0  # answers without one (GET /model)
    old_after_last: int = 0  # answers of an old version sent after the last old pod was gone
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_during_ms: dict[str, float] = field(default_factory=dict)
    proxy: dict[str, int] = field(default_factory=dict)  # HAProxy's own counts for the backend
    initial_ready_s: list[float] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    old_version: str = ""
    new_version: str = ""

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def resets(self) -> int:
        return self.failures.get("reset", 0)

    @property
    def passed(self) -> bool:
        return (
            self.requests > 0
            and self.failed == 0
            and self.old_after_last == 0
            and self.versions.get(self.old_version, 0) > 0
            and self.versions.get(self.new_version, 0) > 0
            and not any(r.killed for r in self.replacements)
        )


def new_version(exported: Path, out: Path, version: str) -> Path:
    """An exported folder like `exported` whose mnist-cnn is the same model under another version: the ONNX
    metadata's `version` changed with the onnx package, the verification digits and models.json alongside (its
    SHA-256 of the file updated). What a retrained model's export would be to a rolling update."""
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(exported / f"{MODEL}.onnx"))
    for prop in model.metadata_props:
        if prop.key == "version":
            prop.value = version
    onnx.save(model, str(out / f"{MODEL}.onnx"))
    shutil.copy(exported / "verification-digits.npz", out / "verification-digits.npz")
    registry = json.loads((exported / "models.json").read_text())
    registry["models"] = {MODEL: registry["models"][MODEL]}
    registry["models"][MODEL]["sha256"] = hashlib.sha256((out / f"{MODEL}.onnx").read_bytes()).hexdigest()
    (out / "models.json").write_text(json.dumps(registry, indent=2) + "\n")
    return out


def shipped_version(exported: Path) -> str:
    model = onnx.load(str(exported / f"{MODEL}.onnx"), load_external_data=False)
    return next(p.value for p in model.metadata_props if p.key == "version")


class LoadBalancer:
    """HAProxy in the foreground (`-db`), one server slot per pod, driven through its runtime API (a Unix socket)."""

    def __init__(self, folder: Path, slots: dict[str, int], retries: bool) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A Unix socket's path has at most 107 bytes; a results folder's may be longer.
        self.socket = Path(tempfile.gettempdir()) / f"rollout-haproxy-{os.getpid()}-{self.port}.sock"
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in slots.items())
        self.config = folder / "haproxy.cfg"
        self.config.write_text(
            HAPROXY_CFG.format(
                socket=self.socket,
                port=self.port,
                retries=RETRIES if retries else "",
                inter_ms=int(CHECK_INTERVAL_S * 1000),
                servers=servers,
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> LoadBalancer:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        check = subprocess.run([haproxy, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {self.config}:\n{check.stdout}{check.stderr}")
        self._log = open(self.folder / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(self.config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not start; see {self.folder / 'haproxy.log'}")
            time.sleep(POLL_S)
        return self

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend: a row per server slot and one for the backend ("BACKEND")."""
        text = self.command("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "replicas"}

    def status(self, slot: str) -> str:
        return self.stats()[slot]["status"]  # "UP", "DOWN", "DRAIN", "UP 1/2" (going down), "DOWN 1/2" (going up)

    def wait(self, slot: str, status: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status(slot) != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy slot {slot} not {status} within {timeout:g} s: {self.status(slot)}")
            time.sleep(POLL_S)

    def put(self, slot: str, port: int) -> None:
        """A new pod in `slot` (a slot HAProxy already sees DOWN: it joins only after `rise` good checks)."""
        self.command(f"set server replicas/{slot} addr 127.0.0.1 port {port}")
        self.command(f"set server replicas/{slot} state ready")

    def remove(self, slot: str) -> int:
        """The endpoint of a terminating pod goes: no new request; returns the requests in flight on it."""
        self.command(f"set server replicas/{slot} state drain")
        return int(self.stats()[slot]["scur"] or 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.socket.unlink(missing_ok=True)
        self.proc = None


class Load:
    """Locust, headless, in its own process, until `stop()` (SIGTERM: its users finish their requests, then it
    writes the tally)."""

    def __init__(self, url: str, users: int, pause: float, pool: int, folder: Path) -> None:
        self.tally = folder / "tally.json"
        self.log_path = folder / "locust.log"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
            "--users", str(users), "--spawn-rate", str(users), "--run-time", "3600s", "--stop-timeout", "15",
            "--only-summary",
        ]  # fmt: skip
        env = {**os.environ, "ROLLOUT_TALLY": str(self.tally), "LOADTEST_MAX_PAUSE": str(pause)}
        env["LOADTEST_POOL"] = str(pool)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_spawned(self, timeout: float) -> None:
        """Until every user runs (after the scenario's calibration through the load balancer)."""
        deadline = time.monotonic() + timeout
        while "All users spawned" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"Locust did not start its users (exit {self.proc.poll()}):\n{tail}")
            time.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        if not self.tally.exists():
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Locust wrote no tally (exit {self.proc.returncode}):\n{tail}")
        return json.loads(self.tally.read_text())


class Pod:
    """One replica: a `bentoml serve` in a HAProxy slot."""

    def __init__(self, slot: str, version: str, folder: Path, env: dict[str, str]) -> None:
        self.slot, self.version = slot, version
        self.server = LocalServer(env={**POD_ENV, **env}, log_path=folder / f"pod-{slot}-{version}.log")

    def terminate(self, grace: float) -> tuple[float, bool]:
        """SIGTERM to `bentoml serve` alone, as the kubelet sends it to a container's PID 1; (seconds to its exit,
        whether it had to be killed at the end of the grace period)."""
        proc = self.server.proc
        assert proc is not None, "the pod is not running"
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        took = time.perf_counter() - sent
        self.server.stop()  # its log closed, its BENTOML_HOME removed (the process is gone already)
        return took, killed


def percentiles(times_ms: list[float]) -> dict[str, float]:
    if not times_ms:
        return {}
    p50, p99 = np.percentile(times_ms, [50, 99])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "max": round(max(times_ms), 1)}


def replace(
    lb: LoadBalancer, old: Pod, free_slot: str, version: str, env: dict[str, str], args: argparse.Namespace,
    folder: Path,
) -> tuple[Pod, Replacement]:  # fmt: skip
    """One step of the rolling update: surge a new pod, then terminate the old one (module docstring)."""
    pod = Pod(free_slot, version, folder, env)
    lb.wait(free_slot, "DOWN", timeout=10)  # its former pod's endpoint is gone: nothing goes there before `rise`
    lb.put(free_slot, pod.server.port)
    started_at = time.time()
    started = time.perf_counter()
    pod.server.start(timeout=args.start_timeout)
    step = Replacement(old=old.slot, new=free_slot, new_version=version, ready_s=pod.server.startup_seconds or 0.0)
    lb.wait(free_slot, "UP", timeout=args.start_timeout)
    step.up_s = time.perf_counter() - started
    if not args.no_removal:
        step.in_flight_at_removal = lb.remove(old.slot)
    time.sleep(args.prestop)  # the preStop hook, while the endpoint's removal reaches every proxy
    step.in_flight_at_sigterm = int(lb.stats()[old.slot]["scur"] or 0)
    step.drain_s, step.killed = old.terminate(args.grace)
    step.window = (started_at, time.time())
    return pod, step


def rollout(args: argparse.Namespace) -> Rollout:
    folder = args.out or RESULTS / f"rollout-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    old_version = shipped_version(args.exported)
    version = f"{old_version}-next"
    new_env = {"MNIST_EXPORTED_DIR": str(new_version(args.exported, folder / "exported-next", version))}
    old_env = {"MNIST_EXPORTED_DIR": str(args.exported)}
    result = Rollout(
        users=args.users, prestop_s=args.prestop, retries=not args.plain_haproxy, removal=not args.no_removal
    )
    result.old_version, result.new_version = old_version, version

    pods = [Pod(f"r{i}", old_version, folder, old_env) for i in (1, 2)]
    # The surge's slot starts on a port nothing listens on: HAProxy sees it DOWN before any load.
    slots = {p.slot: p.server.port for p in pods} | {"r3": free_port()}
    lb = LoadBalancer(folder, slots, retries=not args.plain_haproxy)
    load: Load | None = None
    try:
        starts = [threading.Thread(target=p.server.start, kwargs={"timeout": args.start_timeout}) for p in pods]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        for p in pods:
            if p.server.startup_seconds is None:
                raise RuntimeError(f"pod {p.slot} did not start; see {p.server.log_path}")
        result.initial_ready_s = [round(p.server.startup_seconds or 0.0, 2) for p in pods]
        lb.start()
        for slot in slots:
            lb.wait(slot, "UP" if slot != "r3" else "DOWN", timeout=10)
        began = time.perf_counter()
        load = Load(lb.url, args.users, args.pause, args.pool, folder)
        load.wait_spawned(timeout=args.start_timeout)
        time.sleep(args.settle)
        free = "r3"
        for _ in range(args.replacements):
            old = pods.pop(0)
            pod, step = replace(lb, old, free, version, new_env, args, folder)
            pods.append(pod)
            result.replacements.append(step)
            free = old.slot
            print(
                f"replaced {old.slot} ({old.version}) by {pod.slot} ({version}): ready {step.ready_s:.1f} s, "
                f"UP {step.up_s:.1f} s, drained in {step.drain_s:.2f} s",
                file=sys.stderr,
            )
        time.sleep(args.settle)
        tally = load.stop()
        load = None
        result.seconds = round(time.perf_counter() - began, 1)
        backend = lb.stats()["BACKEND"]
        result.proxy = {
            key: int(backend[column] or 0)
            for key, column in (
                ("retries", "wretr"), ("redispatches", "wredis"), ("connection_errors", "econ"),
                ("response_errors", "eresp"), ("http_5xx", "hrsp_5xx"),
            )
        }  # fmt: skip
    finally:
        if load is not None:
            load.stop()
        for p in pods:
            p.server.stop()
        lb.stop()
    summarize(result, tally)
    (folder / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def summarize(result: Rollout, tally: dict[str, Any]) -> None:
    rows = tally["rows"]
    result.requests = len(rows)
    outcomes = Counter(row[3] for row in rows)
    result.failures = {kind: n for kind, n in outcomes.items() if kind != "ok"}
    result.examples = tally["examples"]
    answered = Counter(row[4] for row in rows if row[3] == "ok")
    result.no_version = answered.pop("", 0)
    result.versions = dict(answered)
    if result.replacements:
        last_gone = result.replacements[-1].window[1]
        result.old_after_last = sum(1 for row in rows if row[0] > last_gone and row[4] == result.old_version)
    result.latency_ms = percentiles([row[1] for row in rows])
    windows = [r.window for r in result.replacements]
    result.latency_during_ms = percentiles([row[1] for row in rows if any(a <= row[0] <= b for a, b in windows)])


def report(result: Rollout) -> str:
    latency = ", ".join(f"{k} {v:.0f} ms" for k, v in result.latency_ms.items())
    during = ", ".join(f"{k} {v:.0f} ms" for k, v in result.latency_during_ms.items())
    failures = ", ".join(f"{n} {kind}" for kind, n in sorted(result.failures.items())) or "none"
    lines = [
        f"{result.requests} requests in {result.seconds:.0f} s from {result.users} users through HAProxy "
        f"({'retry-on conn-failure empty-response, redispatch' if result.retries else 'HAProxy defaults'}), "
        f"{len(result.replacements)} replacements, "
        f"{'endpoint removed, then' if result.removal else 'endpoint NOT removed,'} preStop {result.prestop_s:g} s",
        f"failed: {result.failed} ({failures}); resets: {result.resets}",
        *(f"  e.g. {kind}: {text}" for kind, text in result.examples.items()),
        "answers per version: "
        + ", ".join(f"{v} {n}" for v, n in result.versions.items())
        + f" (+{result.no_version} without one: GET /model); old version after the last replacement: "
        f"{result.old_after_last}",
        "HAProxy: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.proxy.items()),
        f"latency: {latency}; during the replacements: {during}",
        f"first two pods ready in {', '.join(f'{s:.1f} s' for s in result.initial_ready_s)}",
    ]
    for i, r in enumerate(result.replacements, 1):
        lines.append(
            f"replacement {i}: {r.old} -> {r.new} ({r.new_version}): new pod ready {r.ready_s:.1f} s after its start, "
            f"UP in HAProxy {r.up_s:.1f} s; old pod: {r.in_flight_at_removal} in flight at removal, "
            f"{r.in_flight_at_sigterm} at SIGTERM, drained in {r.drain_s:.2f} s"
            + (" (SIGKILL at the grace period)" if r.killed else "")
        )
    lines.append("PASSED" if result.passed else "FAILED")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="Locust users (default 16)")
    parser.add_argument("--pause", type=float, default=0.3, help="most seconds a user waits between requests (0.3)")
    parser.add_argument("--pool", type=int, default=512, help="MNIST test digits the users send (default 512)")
    parser.add_argument("--replacements", type=int, default=2, help="pods replaced one after the other (default 2)")
    # The defaults are deploy/k8s/base/deployment.yaml's.
    parser.add_argument("--prestop", type=float, default=10.0, help="preStop delay: removal to SIGTERM (default 10 s)")
    parser.add_argument("--grace", type=float, default=40.0, help="terminationGracePeriodSeconds (default 40)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of load before and after (default 5)")
    parser.add_argument("--start-timeout", type=float, default=120.0, help="most seconds for a pod to be ready")
    parser.add_argument(
        "--plain-haproxy", action="store_true", help="HAProxy's own retry defaults (no retry-on, no redispatch)"
    )
    parser.add_argument(
        "--no-removal",
        action="store_true",
        help="SIGTERM without removing the endpoint first: HAProxy learns of it only from its failing checks",
    )
    parser.add_argument("--exported", type=Path, default=REPO / "exported", help="the shipped models' folder")
    parser.add_argument("--out", type=Path, help="logs and summary.json (default loadtest/results/rollout-<time>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        print("haproxy is not installed: apt-get install -y haproxy (`make sysdeps`)", file=sys.stderr)
        return 2
    result = rollout(args)
    print(report(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
