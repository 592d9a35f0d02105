"""What one /predict costs inside the server process, layer by layer (issue 14), without HTTP or a load generator.

    .venv/bin/python -m benchmarks.request_costs                  # microseconds per request (medians)
    .venv/bin/python -m benchmarks.request_costs --markdown /tmp/costs.md

Each ASGI app is called directly on one event loop with a pre-built request (a real MNIST digit as a
multipart PNG, the body that `make bench` sends), so the figures are CPU time per request with nothing
else in between: no sockets, no h11, no client. uvicorn's own share (h11, sockets) is the floor of
`make bench` (`floor` server), measured there over real HTTP.

Rows:
- the service's app as `bentoml serve` builds it (`MNIST.to_asgi()`), from BentoML's per-request defaults
  (access log, a tracing span per request, its API dispatch) to the way we ship, one setting at a time;
- /ping as shipped: what is left of the stack around our handler;
- the FastAPI baseline (benchmarks/baseline.py) and a bare ASGI app, called the same way.

Prometheus counts in multiprocess mode, as in `bentoml serve` (a temporary PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="request-costs-prom-"))
os.environ.setdefault("MNIST_MODELS", "mnist-cnn")
os.environ.setdefault("MNIST_WORKERS", "1")

from loadtest.digits import mnist_test_digits, single_body

ASGI = Callable[..., Any]


def scope_for(path: str, content_type: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:3000"), (b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }


async def call(app: ASGI, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """One request through `app`; returns the status and the body it sent."""
    delivered = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    status, chunks = 0, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope_for(path, content_type), receive, send)
    return status, b"".join(chunks)


async def with_lifespan(app: ASGI, work: Callable[[], Any]) -> Any:
    """Run `work()` while `app` is started (its lifespan startup done), then shut it down."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started, stopped = asyncio.Event(), asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.startup"):
            if message["type"].endswith("failed"):
                raise RuntimeError(f"start-up failed: {message}")
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            stopped.set()

    await queue.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, queue.get, send))
    await asyncio.wait_for(started.wait(), 120)
    try:
        return await work()
    finally:
        await queue.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(stopped.wait(), 30)
        await task


async def per_request_us(app: ASGI, path: str, bodies: list[bytes], content_type: str, n: int, runs: int) -> float:
    """Median over `runs` of the mean time of `n` sequential requests, in microseconds; every answer 200."""
    for body in bodies[:50]:  # warm-up
        status, answer = await call(app, path, body, content_type)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
    means = []
    for _ in range(runs):
        start = time.perf_counter()
        for i in range(n):
            await call(app, path, bodies[i % len(bodies)], content_type)
        means.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(means)


# The service as `bentoml serve` builds it, from BentoML's per-request defaults to the way we ship: each row
# turns one more of them off through the service's own settings (docs/api.md, "Settings").
SERVICE_ROWS: list[tuple[str, dict[str, str]]] = [
    ("service, BentoML's defaults: access log, tracing spans, API dispatch",
     {"MNIST_ACCESS_LOG": "1", "MNIST_TRACING": "1", "MNIST_FAST_PATH": "0"}),
    ("+ access log off (MNIST_ACCESS_LOG=0)", {"MNIST_ACCESS_LOG": "0", "MNIST_TRACING": "1", "MNIST_FAST_PATH": "0"}),
    ("+ no tracing spans (MNIST_TRACING=0)", {"MNIST_ACCESS_LOG": "0", "MNIST_TRACING": "0", "MNIST_FAST_PATH": "0"}),
    ("+ fast path (MNIST_FAST_PATH=1): as shipped", {}),
]  # fmt: skip


def rows() -> list[tuple[str, str, dict[str, str] | None]]:
    """(name, path, the service's environment, or None for a baseline app), in table order."""
    out: list[tuple[str, str, dict[str, str] | None]] = [(name, "/predict", env) for name, env in SERVICE_ROWS]
    out.append(("service /ping, as shipped", "/ping", {}))
    out.append(("FastAPI baseline /predict", "/predict", None))
    out.append(("bare ASGI app (constant answer)", "/predict", None))
    return out


def measure_row(index: int, requests: int, runs: int) -> float:
    """One row, in this process (BentoML's metrics and configuration are process-wide: one app per process)."""
    name, path, env = rows()[index]
    digits = mnist_test_digits(200, seed=1)
    pairs = [single_body(d, "mnist-cnn") for d in digits]
    bodies, content_type = [b for b, _ in pairs], pairs[0][1]
    if env is not None:
        os.environ.update(env)
        from service.service import MNIST

        app = MNIST.to_asgi(is_main=True)
    else:
        from benchmarks import baseline

        app = baseline.fastapi_app if name.startswith("FastAPI") else baseline.floor_app

    async def work() -> float:
        return await per_request_us(app, path, bodies, content_type, requests, runs)

    return asyncio.run(with_lifespan(app, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per run (1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row and process; their median counts (3)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per row, in alternating order (3)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # internal: measure one row, print it
    args = parser.parse_args(argv)
    if args.row is not None:
        print(f"ROW {measure_row(args.row, args.requests, args.runs)}")
        return 0

    # Each row in its own process (BentoML's configuration and metrics are process-wide), the rows in
    # alternating order over --rounds rounds, so that a slow spell of the machine hits every row alike.
    names = [name for name, _, _ in rows()]
    figures: dict[int, list[float]] = {i: [] for i in range(len(names))}
    for rnd in range(args.rounds):
        order = range(len(names)) if rnd % 2 == 0 else reversed(range(len(names)))
        for index in order:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.request_costs", "--row", str(index),
                 "--requests", str(args.requests), "--runs", str(args.runs)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or not found:
                raise RuntimeError(f"{names[index]}: failed\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            figures[index].append(float(found[-1].split()[1]))
            print(f"  round {rnd + 1}: {figures[index][-1]:8.1f} us  {names[index]}", flush=True)
    table = [(names[i], statistics.median(values)) for i, values in figures.items()]

    text = "\n".join(["| per request, in process | µs |", "|---|---|", *(f"| {n} | {us:.0f} |" for n, us in table)])
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
