"""Chaos measurements of issue 13 that need load, not just a fault: memory under a burst of big decodes, the
listen queue under 5,000 connections, and the keep-alive balance of 2 workers against 1.

    .venv/bin/python -m benchmarks.chaos                         # = make chaos; prints a markdown table
    .venv/bin/python -m benchmarks.chaos --markdown /tmp/chaos.md --json /tmp/chaos.json

1. **Big decodes**: `--clients` (64) concurrent uploads of one 16-bit 4096x4096 PNG (a real MNIST digit
   blown up: ~40 kB that decode to 16.7 M pixels), `--uploads` (192) in all, to a default 2-worker server.
   Reported: status counts (5xx other than 503 = failure), peak worker RSS (psutil, sampled every 50 ms)
   and the RSS 5 s after the burst.
2. **Backlog**: wrk opens 5,000 keep-alive connections at once to /predict for `--seconds` (20); the
   listening socket's accept queue (`ss -ltn`, Recv-Q) is sampled every 100 ms. Reported: the longest
   queue and the time until it first drains to 0.
3. **Keep-alive balance**: wrk, 16 keep-alive connections opened together, /predict for `--seconds`, on a
   2-worker and on a 1-worker server: req/s and CPU per worker; the ratio should stay >= 1.8.

wrk and the server share the machine's cores, as in benchmarks/bench_service.py (whose wrk runner this reuses).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from benchmarks.bench_service import check_answers, run_wrk, write_bodies
from loadtest.digits import calibrate, mnist_test_digits, single_body
from loadtest.server import LocalServer

MODEL = "mnist-cnn"


def big_png(pixels: np.ndarray, side: int = 4096) -> bytes:
    """A 28x28 uint8 digit blown up to side x side, 16-bit grey."""
    image = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(out, format="PNG")
    return out.getvalue()


class RssSampler:
    """Peak RSS per worker of `server`, sampled in a thread every `period` s."""

    def __init__(self, server: LocalServer, period: float = 0.05) -> None:
        self.server, self.period = server, period
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for w in self.server.workers():
                self.peak[w.pid] = max(self.peak.get(w.pid, 0), w.rss)
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def big_decodes(args: Any, logs: Path) -> dict[str, Any]:
    with LocalServer(env={"MNIST_WORKERS": "2", "MNIST_MODELS": MODEL}, log_path=logs / "big.log") as server:
        idle = [w.rss for w in server.workers()]
        # A digit the model reads right blown up too, so that a wrong answer under load means something.
        for digit in calibrate(server.url, mnist_test_digits(16), MODEL).kept:
            png = big_png(np.asarray(Image.open(io.BytesIO(digit.png))))
            answer = requests.post(f"{server.url}/predict", files={"image": ("big.png", png)}, timeout=60)
            if answer.status_code == 200 and answer.json()["digit"] == digit.label:
                break
        else:
            raise RuntimeError("no blown-up MNIST digit was read right; cannot check answers under load")

        def upload(_: int) -> tuple[int, int | None]:
            try:
                r = requests.post(f"{server.url}/predict", files={"image": ("big.png", png)}, timeout=60)
                return r.status_code, r.json().get("digit") if r.status_code == 200 else None
            except requests.RequestException:
                return 0, None  # no answer at all

        started = time.perf_counter()
        with RssSampler(server) as rss, ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(upload, range(args.uploads)))
        wall = time.perf_counter() - started
        time.sleep(5)
        after = [w.rss for w in server.workers()]
        wrong = check_answers(server.url, calibrate(server.url, mnist_test_digits(64), MODEL).kept, MODEL)
    statuses = Counter(status for status, _ in results)
    return {
        "uploads": args.uploads,
        "clients": args.clients,
        "png_bytes": len(png),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if (s >= 500 and s != 503) or s == 0),
        "wrong_digits": sum(1 for s, d in results if s == 200 and d != digit.label),
        "seconds": wall,
        "idle_rss_mib": [r / 2**20 for r in idle],
        "peak_rss_mib": [r / 2**20 for r in rss.peak.values()],
        "after_rss_mib": [r / 2**20 for r in after],
        "wrong_after": wrong,
    }


def wait_until_idle(url: str, limit_s: float = 180.0) -> None:
    """After wrk stops, the server still answers what its connections had sent: wait until /ping is quick."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            requests.post(f"{url}/ping", timeout=1)
            return
        except requests.RequestException:
            time.sleep(1)
    raise RuntimeError(f"the server at {url} is still busy {limit_s:.0f} s after the load stopped")


def accept_queue(port: int) -> int:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    found = re.match(r"\S+\s+(\d+)", out.strip())
    return int(found[1]) if found else 0


def backlog(args: Any, logs: Path, workers: int) -> dict[str, Any]:
    env = {"MNIST_WORKERS": str(workers), "MNIST_MODELS": MODEL}
    with (
        LocalServer(env=env, log_path=logs / f"backlog-{workers}w.log") as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        digits = calibrate(server.url, mnist_test_digits(200), MODEL).kept
        folder = write_bodies(Path(tmp), [single_body(d, MODEL)[0] for d in digits])
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not done.is_set():
                samples.append((time.perf_counter() - start, accept_queue(server.port)))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stats, _ = run_wrk(f"{server.url}/predict", folder, len(digits), args.connections, args.seconds)
        done.set()
        sampler.join()
        wait_until_idle(server.url)
        wrong = check_answers(server.url, digits, MODEL)
    peak_at = max(range(len(samples)), key=lambda i: samples[i][1]) if samples else 0
    drained = next((t for t, q in samples[peak_at:] if q == 0), None)
    return {
        "workers": workers,
        "connections": args.connections,
        "max_queue": max((q for _, q in samples), default=0),
        "drained_after_s": drained,
        "seconds": args.seconds,
        "requests_per_s": stats["requests"] / (stats["duration_us"] / 1e6),
        "errors": {k: v for k, v in stats.items() if k.startswith("errors_") and v},
        "wrong": wrong,
    }


def balance(args: Any, logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workers in (2, 1):
        env = {"MNIST_WORKERS": str(workers), "MNIST_MODELS": MODEL}
        with (
            LocalServer(env=env, log_path=logs / f"balance-{workers}w.log") as server,
            tempfile.TemporaryDirectory() as tmp,
        ):
            digits = calibrate(server.url, mnist_test_digits(200), MODEL).kept
            folder = write_bodies(Path(tmp), [single_body(d, MODEL)[0] for d in digits])
            run_wrk(f"{server.url}/predict", folder, len(digits), 16, 2)  # warm-up, discarded
            before = {w.pid: w.cpu_seconds for w in server.workers()}
            stats, _ = run_wrk(f"{server.url}/predict", folder, len(digits), 16, args.seconds)
            cpu = [100 * (w.cpu_seconds - before.get(w.pid, 0)) / args.seconds for w in server.workers()]
            out[f"{workers}w"] = {
                "requests_per_s": stats["requests"] / (stats["duration_us"] / 1e6),
                "worker_cpu": cpu,
                "errors": sum(v for k, v in stats.items() if k.startswith("errors_")),
                "wrong": check_answers(server.url, digits, MODEL),
            }
    out["ratio"] = out["2w"]["requests_per_s"] / out["1w"]["requests_per_s"]
    return out


def render(results: dict[str, Any]) -> str:
    big, b2, b1, bal = results["big"], results["backlog_2w"], results["backlog_1w"], results["balance"]
    mib = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    drain = lambda r: "not drained" if r["drained_after_s"] is None else f"{r['drained_after_s']:.1f} s"  # noqa: E731
    lines = [
        f"Measured {results['finished']} UTC, load average at start {results['load']}.",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| {big['uploads']} uploads of a 16-bit 4096x4096 PNG ({big['png_bytes'] // 1024} kB), {big['clients']} "
        f"concurrent, 2 workers | statuses {big['statuses']}; 5xx other than 503: **{big['server_errors']}**; "
        f"wrong digits {big['wrong_digits']}; {big['seconds']:.0f} s |",
        f"| worker RSS: idle / peak / 5 s after (MiB) | {mib(big['idle_rss_mib'])} / **{mib(big['peak_rss_mib'])}** / "
        f"{mib(big['after_rss_mib'])} |",
        f"| {b2['connections']} keep-alive connections at once, 2 workers, {b2['seconds']} s | longest accept queue "
        f"{b2['max_queue']}, drained to 0 after **{drain(b2)}**; {b2['requests_per_s']:.0f} req/s; "
        f"wrk errors {b2['errors'] or 0}; wrong {b2['wrong']} |",
        f"| the same, 1 worker | longest queue {b1['max_queue']}, drained after **{drain(b1)}**; "
        f"{b1['requests_per_s']:.0f} req/s; wrk errors {b1['errors'] or 0}; wrong {b1['wrong']} |",
        f"| keep-alive balance, 16 connections, /predict, {results['seconds']} s | 2 workers "
        f"{bal['2w']['requests_per_s']:.0f} req/s (CPU {'+'.join(f'{c:.0f}' for c in bal['2w']['worker_cpu'])} %), "
        f"1 worker {bal['1w']['requests_per_s']:.0f} req/s: **{bal['ratio']:.2f}x** |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=192)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--parts", default="big,backlog,balance", help="comma list of the measurements to run")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    # 5,000 connections need as many descriptors, in wrk and in the server it starts (inherited).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    logs = Path(tempfile.mkdtemp(prefix="chaos-"))
    load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    results: dict[str, Any] = {"load": load, "seconds": args.seconds, "logs": str(logs)}
    parts = set(args.parts.split(","))
    if "big" in parts:
        print("big decodes ...", flush=True)
        results["big"] = big_decodes(args, logs)
        print(json.dumps(results["big"]), flush=True)
    if "backlog" in parts:
        for workers in (2, 1):
            print(f"backlog, {workers} worker(s) ...", flush=True)
            results[f"backlog_{workers}w"] = backlog(args, logs, workers)
            print(json.dumps(results[f"backlog_{workers}w"]), flush=True)
    if "balance" in parts:
        print("keep-alive balance ...", flush=True)
        results["balance"] = balance(args, logs)
        print(json.dumps(results["balance"]), flush=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if parts >= {"big", "backlog", "balance"}:
        table = render(results)
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
