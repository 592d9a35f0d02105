"""HTTP benchmark of the service on this machine, in one go: a table of req/s, p50/p95/p99, errors, CPU and RSS.

    .venv/bin/python -m benchmarks.bench_service                      # 3 rounds, 10 s per measurement
    .venv/bin/python -m benchmarks.bench_service --rounds 5 --markdown /tmp/bench.md --chart docs/img/bench.png

Compared, each on a fresh local `bentoml serve` (MNIST_* environment per configuration):
  /ping (the HTTP floor) vs /predict on the same server; CNN vs MLP (same server, `model` field);
  the Open Inference Protocol's infer (docs/protocol.md) vs /predict on the same server, as tritonclient sends it by
  default (binary tensors in and out): the same PNG files in its BYTES input, and their pixels as FP32;
  1 vs 2 workers; /predict_batch with 64 MNIST PNGs per request (images/s); 2 workers without the patches of
  server internals, all of them and each in turn (MNIST_PATCHES), to show what each earns.
And against the obvious alternative (issue 14), both under plain uvicorn with 2 workers (benchmarks/baseline.py):
  the FastAPI + ONNX Runtime baseline's /predict (same preprocessing, same model file), and the floor, a bare
  ASGI app answering a constant to the same request bodies: what HTTP alone costs.
Start-up (launch to GET /readyz 200) is timed at every start.

Load generator: wrk (C, epoll, one thread) with benchmarks/bodies.lua, which sends pre-built multipart
bodies of real MNIST test digits. On a 2-core machine the client shares the cores with the server, so it must
cost as little CPU per request as possible: wrk needs a few microseconds per request where a Python client
(aiohttp, Locust) needs 100-300, and would itself become the bottleneck. wrk's CPU is reported (`client CPU`).
wrk cannot check answers, so every server's digits are calibrated before the load and a sample of answers
is checked after each measurement; the Locust load test (loadtest/) checks every answer under load.

Noise: other work on the machine moves results by 10-30 %. So configurations alternate (round 1 A B C,
round 2 C B A, ...), every figure is the median over rounds, and ratios are taken within a round (paired)
before their median. The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from PIL import Image

from loadtest.digits import CONTENT_TYPE, Digit, batch_body, calibrate, mnist_test_digits, single_body
from loadtest.server import LocalServer, ProcessSample

HERE = Path(__file__).resolve().parent
LUA = HERE / "bodies.lua"
BENTOML = str(Path(sys.executable).with_name("bentoml"))
MODELS = "mnist-cnn,mnist-mlp"
BATCH_IMAGES = 64
# Open Inference Protocol bodies: each JSON header padded to this length, so that one Inference-Header-Content-Length
# (wrk sends one header set) fits every body.
V2_HEADER_BYTES = 256
V2_PIXEL_INPUT = "image"  # the shipped models' ONNX input name (GET /v2/models/<name> lists it)


@dataclass(frozen=True)
class Workload:
    name: str
    route: str
    model: str | None  # None: no body (ping)
    connections: int
    images: int = 1  # per request; > 1 means /predict_batch
    # Connection: close on every request. With keep-alive, BentoML's workers share one listening socket and
    # the first to wake accepts all of wrk's connections at once (bentoml/BentoML#5426): one worker serves
    # everything. New connections per request let the kernel spread them, at the cost of a TCP handshake.
    close: bool = False
    v2: str | None = None  # Open Inference Protocol infer with a "png" (BYTES) or "fp32" input (route: its infer)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    env: dict[str, str]
    workloads: tuple[Workload, ...]
    command: tuple[str, ...] = ()  # another server than `bentoml serve` ({port} is filled in)
    answers: bool = True  # False: the server answers a constant (no calibration, no answer checks)


def baseline(app: str, workers: int = 2) -> tuple[str, ...]:
    return (sys.executable, "-m", "benchmarks.baseline", app, "--port", "{port}", "--workers", str(workers))


def configs(connections: int, batch_connections: int, before: Path | None = None) -> list[ServerConfig]:
    cnn = Workload("predict cnn", "/predict", "mnist-cnn", connections)
    cnn_close = Workload("predict cnn, conn: close", "/predict", "mnist-cnn", connections, close=True)
    batch = Workload(f"batch{BATCH_IMAGES} cnn", "/predict_batch", "mnist-cnn", batch_connections, BATCH_IMAGES)
    v2_infer = "/v2/models/mnist-cnn/infer"
    v2_png = Workload("v2 infer png cnn", v2_infer, "mnist-cnn", connections, v2="png")
    v2_fp32 = Workload("v2 infer fp32 cnn", v2_infer, "mnist-cnn", connections, v2="fp32")
    base = {"MNIST_MODELS": MODELS, "MNIST_WORKERS": "1"}
    return [
        ServerConfig(
            "1 worker",
            base,
            (
                Workload("ping", "/ping", None, connections),
                cnn,
                cnn_close,
                Workload("predict mlp", "/predict", "mnist-mlp", connections),
                batch,
            ),
        ),
        ServerConfig(
            "2 workers",
            {**base, "MNIST_WORKERS": "2"},
            (cnn, cnn_close, Workload("ping", "/ping", None, connections), batch, v2_png, v2_fp32),
        ),
        # What each patch of a server internal earns (service/http/patches.py): the same server without it.
        *(
            ServerConfig(f"2 workers, {name}", {**base, "MNIST_WORKERS": "2", "MNIST_PATCHES": patches}, (cnn, batch))
            for name, patches in (
                ("no patches", "none"),
                ("no accept patch", "protocol,drain"),
                ("no protocol patch", "accept,drain"),
            )
        ),
        ServerConfig("FastAPI baseline", {}, (cnn,), command=baseline("fastapi")),
        # Another checkout of this repository (an earlier commit), served the same way, in the same rounds.
        *(
            [
                ServerConfig(
                    "2 workers, before",
                    {**base, "MNIST_WORKERS": "2"},
                    (cnn, Workload("ping", "/ping", None, connections), batch),
                    command=(
                        "bash",
                        "-c",
                        f'cd "{before}" && exec "$0" serve --host 127.0.0.1 --port {{port}}',
                        BENTOML,
                    ),
                )
            ]
            if before
            else []
        ),
        ServerConfig(
            "floor", {}, (Workload("constant", "/predict", "mnist-cnn", connections),), baseline("floor"), False
        ),
    ]


@dataclass
class Measurement:
    config: str
    workload: str
    round: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    worker_cpu: list[float]  # % of one core, per worker, during the measurement
    worker_rss_mib: list[float]  # at the end of the measurement
    client_cpu: float  # wrk's CPU, % of one core
    wrong_answers: int


@dataclass
class Results:
    measurements: list[Measurement] = field(default_factory=list)
    startups: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    idle_rss_mib: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    load: list[tuple[float, float, float]] = field(default_factory=list)
    background_cpu: list[float] = field(default_factory=list)  # % of all cores, before each server start
    calibrated: dict[str, list[Digit]] = field(default_factory=dict)  # model -> digits it gets right


def write_bodies(folder: Path, bodies: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, body in enumerate(bodies):
        (folder / f"{n:04d}.bin").write_bytes(body)
    return folder


def bodies_for(workload: Workload, digits: list[Digit]) -> list[bytes]:
    if workload.model is None:
        return [b""]
    if workload.v2:
        return [v2_body(d, workload.v2) for d in digits[:200]]
    if workload.images == 1:
        return [single_body(d, workload.model)[0] for d in digits[:200]]
    groups = [digits[i : i + workload.images] for i in range(0, len(digits) - workload.images + 1, workload.images)]
    return [batch_body(g, workload.model)[0] for g in groups]


def v2_body(digit: Digit, kind: str, binary_output: bool = True) -> bytes:
    """An Open Inference Protocol infer body for one digit, binary tensors in (the PNG file as BYTES, or its pixels as
    FP32), outputs binary or JSON; its JSON header is V2_HEADER_BYTES long."""
    if kind == "png":
        tensor: dict[str, Any] = {"name": "image_bytes", "datatype": "BYTES", "shape": [1]}
        data = len(digit.png).to_bytes(4, "little") + digit.png
    else:
        tensor = {"name": V2_PIXEL_INPUT, "datatype": "FP32", "shape": [1, 1, 28, 28]}
        data = (np.asarray(Image.open(io.BytesIO(digit.png)), dtype="<f4") / np.float32(255)).tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": binary_output}}).encode()
    return header.ljust(V2_HEADER_BYTES) + data  # JSON allows trailing spaces


def run_wrk(
    url: str, folder: Path, count: int, connections: int, seconds: int, close: bool = False, v2: bool = False
) -> tuple[dict[str, Any], float]:
    """One wrk run; returns its JSON summary and the CPU it used (% of one core). `v2`: Open Inference Protocol
    bodies (v2_body)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    content_type, header = (
        ("application/octet-stream", f"Inference-Header-Content-Length: {V2_HEADER_BYTES}")
        if v2
        else (CONTENT_TYPE, "")
    )
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA), url,
        "--", str(folder), str(count), content_type, "close" if close else "keep-alive", header,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    out = done.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"^WRK_JSON (.*)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(match.group(1)), 100 * cpu / seconds


def check_answers(url: str, digits: list[Digit], model: str, count: int = 32, v2: str | None = None) -> int:
    """Wrong answers among `count` single predictions of calibrated digits (all should be right); `v2`: through the
    Open Inference Protocol's infer with that input (JSON outputs)."""
    wrong = 0
    for digit in digits[:count]:
        if v2:
            answer = requests.post(
                f"{url}/v2/models/{model}/infer", data=v2_body(digit, v2, binary_output=False), timeout=30,
                headers={"Inference-Header-Content-Length": str(V2_HEADER_BYTES)},
            )  # fmt: skip
            digits_out = [o["data"] for o in answer.json().get("outputs", []) if o["name"] == "digit"]
            wrong += answer.status_code != 200 or digits_out != [[digit.label]]
            continue
        body, content_type = single_body(digit, model)
        answer = requests.post(f"{url}/predict", data=body, headers={"Content-Type": content_type}, timeout=30)
        wrong += answer.status_code != 200 or answer.json()["digit"] != digit.label
    return wrong


def cpu_by_pid(samples: list[ProcessSample]) -> dict[int, float]:
    return {s.pid: s.cpu_seconds for s in samples if s.role == "worker"}


def measure(
    server: LocalServer, config: ServerConfig, workload: Workload, digits: dict[str, list[Digit]], args: Any, rnd: int
) -> Measurement:
    pool = digits.get(workload.model or "", [])
    if not config.answers:
        pool = digits.get("", [])
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as tmp:
        bodies = bodies_for(workload, pool)
        folder = write_bodies(Path(tmp), bodies)
        url = server.url + workload.route
        v2 = workload.v2 is not None
        run_wrk(url, folder, len(bodies), workload.connections, args.warmup, workload.close, v2)  # discarded
        before, t0 = cpu_by_pid(server.sample()), time.perf_counter()
        stats, client_cpu = run_wrk(url, folder, len(bodies), workload.connections, args.duration, workload.close, v2)
        wall = time.perf_counter() - t0
        workers = server.workers()
    errors = sum(v for k, v in stats.items() if k.startswith("errors_"))
    rps = stats["requests"] / (stats["duration_us"] / 1e6)
    wrong = check_answers(server.url, pool, workload.model, v2=workload.v2) if workload.model and config.answers else 0
    return Measurement(
        config=config.name,
        workload=workload.name,
        round=rnd,
        requests_per_s=rps,
        images_per_s=rps * workload.images if workload.model else 0.0,
        p50_ms=stats["p50_us"] / 1000,
        p95_ms=stats["p95_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        errors=errors,
        worker_cpu=[100 * (w.cpu_seconds - before.get(w.pid, 0.0)) / wall for w in workers],
        worker_rss_mib=[w.rss / 2**20 for w in workers],
        client_cpu=client_cpu,
        wrong_answers=wrong,
    )


def background_cpu(limit: float, patience: float) -> float:
    """CPU use of everything else on the machine (% of all cores, over 2 s, none of ours running).

    Waits up to `patience` seconds for it to fall to `limit`: other jobs (tests, builds) come and go.
    """
    deadline = time.monotonic() + patience
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        if busy <= limit or time.monotonic() >= deadline:
            return busy
        print(f"  waiting: other processes use {busy:.0f} % of the CPU (limit {limit:.0f} %)", flush=True)


def run_config(config: ServerConfig, rnd: int, args: Any, results: Results, pool: list[Digit]) -> None:
    results.background_cpu.append(background_cpu(args.quiet_cpu, args.quiet_wait))
    log = args.logs / f"server-{rnd}-{config.name.replace(' ', '_')}.log"
    with LocalServer(env=config.env, log_path=log, command=list(config.command) or None) as s:
        results.startups[config.name].append(s.startup_seconds or 0.0)
        results.idle_rss_mib[config.name] += [w.rss / 2**20 for w in s.workers()]
        digits = {"": pool[:200]}  # for a server that answers a constant: the same bodies, unchecked
        for model in {w.model for w in config.workloads if w.model and config.answers}:
            if config.command:  # a baseline has no /model or /predict_batch: the digits our server got right
                digits[model] = results.calibrated.get(model, pool)
                continue
            calibration = calibrate(s.url, pool, model)
            if not calibration.ok:
                raise RuntimeError(f"{config.name}: {model} got only {100 * calibration.accuracy:.1f} % right")
            digits[model] = results.calibrated[model] = calibration.kept
        order = config.workloads if rnd % 2 == 0 else config.workloads[::-1]
        for workload in order:
            m = measure(s, config, workload, digits, args, rnd)
            results.measurements.append(m)
            print(
                f"  round {rnd + 1} | {config.name:20s} | {workload.name:14s} | {m.requests_per_s:7.0f} req/s | "
                f"p50 {m.p50_ms:5.1f} p99 {m.p99_ms:6.1f} ms | errors {m.errors} | wrong {m.wrong_answers} | "
                f"server CPU {'+'.join(f'{c:.0f}' for c in m.worker_cpu)} % | wrk CPU {m.client_cpu:.0f} %",
                flush=True,
            )


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: Results) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Median rows per (config, workload) and the paired ratios (median of per-round ratios)."""
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in results.measurements:
        groups[(m.config, m.workload)].append(m)
    rows = []
    for (config, workload), ms in groups.items():
        rows.append(
            {
                "config": config,
                "workload": workload,
                "rounds": len(ms),
                "req_per_s": med([m.requests_per_s for m in ms]),
                "images_per_s": med([m.images_per_s for m in ms]),
                "p50_ms": med([m.p50_ms for m in ms]),
                "p95_ms": med([m.p95_ms for m in ms]),
                "p99_ms": med([m.p99_ms for m in ms]),
                "errors": sum(m.errors for m in ms),
                "wrong": sum(m.wrong_answers for m in ms),
                # Busiest worker first: with few keep-alive connections one worker may get most of them.
                "worker_cpu": [
                    med(list(c)) for c in zip(*(sorted(m.worker_cpu, reverse=True) for m in ms), strict=False)
                ],
                "workers": max(len(m.worker_cpu) for m in ms),
                "worker_rss_mib": med([max(m.worker_rss_mib, default=0.0) for m in ms]),
                "client_cpu": med([m.client_cpu for m in ms]),
            }
        )

    def paired(a: tuple[str, str], b: tuple[str, str], key: str = "requests_per_s") -> float:
        by_round = {m.round: getattr(m, key) for m in groups.get(b, [])}
        return med([getattr(m, key) / by_round[m.round] for m in groups.get(a, []) if by_round.get(m.round)])

    one = "1 worker"
    ratios = {
        "predict cnn / ping (req/s)": paired((one, "predict cnn"), (one, "ping")),
        "predict mlp / predict cnn (req/s)": paired((one, "predict mlp"), (one, "predict cnn")),
        "2 workers / 1 worker (req/s)": paired(("2 workers", "predict cnn"), (one, "predict cnn")),
        "2 workers / 1 worker (p99)": paired(("2 workers", "predict cnn"), (one, "predict cnn"), "p99_ms"),
        "2 workers / 1 worker, conn: close (req/s)": paired(
            ("2 workers", "predict cnn, conn: close"), (one, "predict cnn, conn: close")
        ),
        "2 workers: predict cnn / ping (req/s)": paired(("2 workers", "predict cnn"), ("2 workers", "ping")),
        "2 workers: v2 infer png / predict cnn (req/s)": paired(
            ("2 workers", "v2 infer png cnn"), ("2 workers", "predict cnn")
        ),
        "2 workers: v2 infer png / predict cnn (p99)": paired(
            ("2 workers", "v2 infer png cnn"), ("2 workers", "predict cnn"), "p99_ms"
        ),
        "2 workers: v2 infer fp32 / predict cnn (req/s)": paired(
            ("2 workers", "v2 infer fp32 cnn"), ("2 workers", "predict cnn")
        ),
        "2 workers / 1 worker, batch (images/s)": paired(
            ("2 workers", f"batch{BATCH_IMAGES} cnn"), (one, f"batch{BATCH_IMAGES} cnn"), "images_per_s"
        ),
        "ours (2 workers) / FastAPI baseline, /predict (req/s)": paired(
            ("2 workers", "predict cnn"), ("FastAPI baseline", "predict cnn")
        ),
        "ours (2 workers) / FastAPI baseline, /predict (p99)": paired(
            ("2 workers", "predict cnn"), ("FastAPI baseline", "predict cnn"), "p99_ms"
        ),
        "FastAPI baseline / floor (req/s)": paired(("FastAPI baseline", "predict cnn"), ("floor", "constant")),
        **{
            f"2 workers / {variant} ({what})": paired(("2 workers", workload), (variant, workload), key)
            for variant in ("2 workers, no patches", "2 workers, no accept patch", "2 workers, no protocol patch")
            for what, workload, key in (
                ("req/s", "predict cnn", "requests_per_s"),
                ("p99", "predict cnn", "p99_ms"),
                ("batch images/s", f"batch{BATCH_IMAGES} cnn", "images_per_s"),
            )
        },
        **{
            f"2 workers / 2 workers, before ({what})": paired(
                ("2 workers", workload), ("2 workers, before", workload), key
            )
            for what, workload, key in (
                ("req/s", "predict cnn", "requests_per_s"),
                ("p99", "predict cnn", "p99_ms"),
                ("batch images/s", f"batch{BATCH_IMAGES} cnn", "images_per_s"),
                ("ping req/s", "ping", "requests_per_s"),
            )
        },
        "ours /ping / floor (req/s)": paired(("2 workers", "ping"), ("floor", "constant")),
    }
    return rows, ratios


def targets(
    rows: list[dict[str, Any]], ratios: dict[str, float], results: Results, clients: int
) -> list[tuple[str, str, bool]]:
    def row(config: str, workload: str) -> dict[str, Any]:
        return next((r for r in rows if r["config"] == config and r["workload"] == workload), {})

    # The targets are for the default settings: one worker per core, here 2.
    cnn, batch = row("2 workers", "predict cnn"), row("2 workers", f"batch{BATCH_IMAGES} cnn")
    startup = med(results.startups.get("2 workers", []))
    ratio = ratios["2 workers: predict cnn / ping (req/s)"]
    p99, images = cnn.get("p99_ms", float("nan")), batch.get("images_per_s", float("nan"))
    errors = sum(r["errors"] + r["wrong"] for r in rows)
    versus = ratios["ours (2 workers) / FastAPI baseline, /predict (req/s)"]
    versus_p99 = ratios["ours (2 workers) / FastAPI baseline, /predict (p99)"]
    return [
        ("/predict >= 1.0x the FastAPI baseline's req/s", f"{versus:.2f}x", versus >= 1.0),
        ("/predict p99 no worse than the baseline's", f"{versus_p99:.2f}x the baseline's", versus_p99 <= 1.0),
        ("/predict >= 70 % of /ping throughput", f"{100 * ratio:.0f} %", ratio >= 0.70),
        (f"p99 at {clients} clients <= 50 ms", f"{p99:.1f} ms", p99 <= 50),
        (f"/predict_batch ({BATCH_IMAGES} PNGs) >= 5000 images/s", f"{images:.0f} images/s", images >= 5000),
        ("start-up to ready <= 10 s", f"{startup:.1f} s", startup <= 10),
        ("no errors, no wrong answers", str(errors), errors == 0),
    ]


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")), "?")
    return {
        "cpu": cpu,
        "cores": str(psutil.cpu_count(logical=True)),
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip(),
    }


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        "| server | workload | clients | req/s | images/s | p50 ms | p95 ms | p99 ms | errors | wrong "
        "| CPU % per worker | RSS/worker MiB | wrk CPU % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        images = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        lines.append(
            f"| {r['config']} ({r['workers']}w) | {r['workload']} | {r['clients']} | {r['req_per_s']:.0f} | {images} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['wrong']} "
            f"| {'+'.join(f'{c:.0f}' for c in r['worker_cpu'])} | {r['worker_rss_mib']:.0f} | {r['client_cpu']:.0f} |"
        )
    return lines


def render(rows: list[dict[str, Any]], ratios: dict[str, float], results: Results, args: Any) -> str:
    loads = results.load
    lines = [
        f"Machine: {machine()}",
        f"Load average (1 min) at the round starts and the end: {', '.join(f'{lo[0]:.2f}' for lo in loads)}",
        "CPU used by other processes before each server start (% of all cores): "
        + ", ".join(f"{b:.0f}" for b in results.background_cpu),
        f"{args.rounds} rounds, {args.duration} s per measurement after {args.warmup} s warm-up; medians.",
        "",
        *table(rows),
        "",
        "| ratio (paired within a round, median) | value |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in ratios.items()),
        "",
        "| start-up to ready (median of starts) | s | idle RSS/worker MiB |",
        "|---|---|---|",
        *(
            f"| {name} | {med(times):.2f} (n={len(times)}) | {med(results.idle_rss_mib[name]):.0f} |"
            for name, times in results.startups.items()
        ),
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(
            f"| {goal} | {value} | {'yes' if ok else 'NO'} |"
            for goal, value, ok in targets(rows, ratios, results, args.connections)
        ),
    ]
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['config']}" for r in rows]
    x = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.bar(x, [r["req_per_s"] for r in rows], color="tab:blue")
    top.set_ylabel("requests/s (median)")
    for i, r in enumerate(rows):
        if r["images_per_s"] and r["images_per_s"] != r["req_per_s"]:
            top.annotate(f"{r['images_per_s']:.0f} img/s", (i, r["req_per_s"]), ha="center", va="bottom")
    width = 0.27
    for k, (pct, color) in enumerate((("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red"))):
        bottom.bar([i + (k - 1) * width for i in x], [r[pct] for r in rows], width, label=pct[:3], color=color)
    bottom.axhline(50, color="grey", linestyle="--", linewidth=1, label="p99 target 50 ms")
    bottom.set_ylabel("latency ms (median)")
    bottom.set_xticks(list(x), labels, fontsize=8)
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    top.set_title("bentoml serve on this machine, wrk load generator (see docs/benchmarks.md)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of discarded load before each (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients for /predict, /ping")
    parser.add_argument("--batch-connections", type=int, default=4, help="concurrent clients for /predict_batch")
    parser.add_argument("--quiet-cpu", type=float, default=10, help="wait for other CPU use <= this %% (10)")
    parser.add_argument("--quiet-wait", type=float, default=60, help="but at most this many seconds (60)")
    parser.add_argument(
        "--only", help="run only the server configurations whose name contains one of these (comma list)"
    )
    parser.add_argument(
        "--before", type=Path, help="also serve this other checkout (e.g. a git worktree of an earlier commit)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--chart", type=Path, help="also draw the medians to this PNG")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "bench-service-logs")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu) or brew install wrk")
    args.logs.mkdir(parents=True, exist_ok=True)

    chosen = [
        c
        for c in configs(args.connections, args.batch_connections, args.before)
        if not args.only or any(o in c.name for o in args.only.split(","))
    ]
    pool = mnist_test_digits(512, seed=1)
    results = Results()
    for rnd in range(args.rounds):
        results.load.append(os.getloadavg())
        print(f"round {rnd + 1}/{args.rounds} (load average {results.load[-1][0]:.2f})", flush=True)
        for config in chosen if rnd % 2 == 0 else chosen[::-1]:
            run_config(config, rnd, args, results, pool)
    results.load.append(os.getloadavg())

    rows, ratios = summarise(results)
    for r in rows:
        r["clients"] = next(
            w.connections for c in chosen if c.name == r["config"] for w in c.workloads if w.name == r["workload"]
        )
    text = render(rows, ratios, results, args)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        payload = {"rows": rows, "ratios": ratios, "startups": results.startups, "load": results.load}
        payload["background_cpu"] = results.background_cpu
        payload["measurements"] = [m.__dict__ for m in results.measurements]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.chart:
        chart(rows, args.chart)
    return 0 if all(r["errors"] == 0 and r["wrong"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
