"""A model version swapped live under load: every request counted, every answer's version checked.

`make bench-versions` (docs/benchmarks.md, "Live versions"): a real `bentoml serve` (MNIST_WORKERS workers, a
management token), client threads sending real MNIST test digits to /predict (and, with --v2, to the Open Inference
Protocol's infer) without pause, and in the middle of it, through the management API:

    1. load a new version of mnist-cnn (the shipped file under a new version name: it passes the gate),
    2. make it the default,
    3. unload the old one.

Printed: requests, failures (any answer but 200, any connection error), answers per version, answers that named no
version, answers from the old version to requests sent after step 2 had answered (must be 0: the management API
answers only once every worker serves the new default), and the time each step took until every worker served it.
tests/test_live_versions.py runs it, shorter, and requires zero failures.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import requests

from loadtest.digits import mnist_test_digits, single_body
from loadtest.server import REPO, LocalServer

MODEL = "mnist-cnn"


@dataclass
class Answer:
    sent: float  # perf_counter when the request was sent
    took: float  # seconds until its answer (or its error)
    route: str
    status: int  # 0: no HTTP answer (connection error)
    version: str | None
    error: str = ""


@dataclass
class Run:
    answers: list[Answer] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step -> its answer, sent/answered times


def new_version(out: Path, version: str) -> Path:
    """The shipped CNN under another version name: a file that passes the gate, as a retrained model would."""
    model = onnx.load(str(REPO / "exported" / f"{MODEL}.onnx"))
    for prop in model.metadata_props:
        if prop.key == "version":
            prop.value = version
    onnx.save(model, str(out))
    return out


def client(url: str, route: str, digits: list[Any], stop: threading.Event, out: list[Answer]) -> None:
    session = requests.Session()
    k = 0
    while not stop.is_set():
        digit = digits[k % len(digits)]
        k += 1
        sent = time.perf_counter()
        try:
            if route == "predict":
                body, content_type = single_body(digit)
                response = session.post(f"{url}/predict", data=body, headers={"Content-Type": content_type}, timeout=30)
                version = response.json().get("version") if response.status_code == 200 else None
            else:
                response = session.post(f"{url}/v2/models/{MODEL}/infer", json=v2_request(digit), timeout=30)
                version = response.json().get("model_version") if response.status_code == 200 else None
            error = "" if response.ok else response.text[:200]
            out.append(Answer(sent, time.perf_counter() - sent, route, response.status_code, version, error))
        except (requests.RequestException, ValueError) as exc:
            out.append(Answer(sent, time.perf_counter() - sent, route, 0, None, repr(exc)[:200]))


def v2_request(digit: Any) -> dict[str, Any]:
    encoded = base64.b64encode(digit.png).decode("ascii")
    return {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}


def manage(url: str, token: str, step: str, path: str, run: Run, headers: dict | None = None, **kwargs: Any) -> None:
    """One management call, timed; its answer goes into run.steps[step]."""
    sent = time.perf_counter()
    response = requests.post(
        f"{url}/v2/repository/models/{MODEL}/{path}",
        headers={**(headers or {}), "Authorization": f"Bearer {token}"}, timeout=60, **kwargs,
    )  # fmt: skip
    run.steps[step] = {"sent": sent, "answered": time.perf_counter(), "status": response.status_code,
                       "body": response.json()}  # fmt: skip


def measure(duration_s: float, clients: int, workers: int, v2: bool, log: Path | None = None) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    digits = mnist_test_digits(200)
    run = Run()
    with tempfile.TemporaryDirectory() as scratch:
        env = {"MNIST_WORKERS": str(workers), "MNIST_MODELS": MODEL, "MNIST_ADMIN_TOKEN": token}
        with LocalServer(env=env, log_path=log) as server:
            old = requests.get(f"{server.url}/model", timeout=10).json()["models"][0]["version"]
            new = f"{old}-live"
            model_file = new_version(Path(scratch) / "new.onnx", new).read_bytes()
            stop = threading.Event()
            routes = ["predict", "v2"] if v2 else ["predict"]
            per_client: list[list[Answer]] = [[] for _ in range(clients)]
            threads = [
                threading.Thread(target=client, args=(server.url, routes[i % len(routes)], digits, stop, per_client[i]))
                for i in range(clients)
            ]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            octet = {"Content-Type": "application/octet-stream"}
            plan = [
                (0.25, "load", "load", {"data": model_file, "headers": octet}),
                (0.50, "default", "default", {"json": {"version": new}}),
                (0.75, "unload", "unload", {"json": {"parameters": {"version": old}}}),
            ]
            for at, step, path, kwargs in plan:
                time.sleep(max(0.0, start + at * duration_s - time.perf_counter()))
                manage(server.url, token, step, path, run, **kwargs)
            time.sleep(max(0.0, start + duration_s - time.perf_counter()))
            stop.set()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
    run.answers = sorted((a for answers in per_client for a in answers), key=lambda a: a.sent)
    return summarise(run, old, new, elapsed, clients, workers)


def summarise(run: Run, old: str, new: str, elapsed: float, clients: int, workers: int) -> dict[str, Any]:
    answers = run.answers
    failed = [a for a in answers if a.status != 200]
    default_done = run.steps["default"]["answered"]
    unload_done = run.steps["unload"]["answered"]
    old_after_default = [a for a in answers if a.sent > default_done and a.version == old]
    last_old = max((a.sent for a in answers if a.version == old), default=None)
    first_new = min((a.sent for a in answers if a.version == new), default=None)
    took = np.array([a.took for a in answers] or [0.0]) * 1000
    return {
        "duration_s": round(elapsed, 1),
        "clients": clients,
        "workers": workers,
        "requests": len(answers),
        "requests_per_s": round(len(answers) / elapsed, 1),
        "failed": len(failed),
        "failures": [f"{a.route} {a.status} {a.error}" for a in failed[:10]],
        "by_route": dict(Counter(a.route for a in answers)),
        "by_version": dict(Counter(a.version for a in answers if a.status == 200)),
        "answers_without_version": sum(1 for a in answers if a.status == 200 and not a.version),
        "old_answers_after_default_answered": len(old_after_default),
        "after_unload_answers": sum(1 for a in answers if a.sent > unload_done),
        "steps": {
            step: {
                "status": info["status"],
                "call_s": round(info["answered"] - info["sent"], 3),
                "every_worker_s": info["body"].get("converged_s"),
                "gate": info["body"].get("gate"),
            }
            for step, info in run.steps.items()
        },
        "first_new_answer_after_default_sent_s": (
            round(first_new - run.steps["default"]["sent"], 3) if first_new is not None else None
        ),
        "last_old_request_after_default_sent_s": (
            round(last_old - run.steps["default"]["sent"], 3) if last_old is not None else None
        ),
        "latency_ms": {
            "p50": round(float(np.percentile(took, 50)), 1),
            "p99": round(float(np.percentile(took, 99)), 1),
            "max": round(float(took.max()), 1),
        },
        "versions": {"old": old, "new": new},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="MNIST_WORKERS (default: %(default)s)")
    parser.add_argument("--v2", action=argparse.BooleanOptionalAction, default=True,
                        help="half the clients use the V2 infer route (default: on)")  # fmt: skip
    parser.add_argument("--log", type=Path, default=None, help="the server's log file")
    args = parser.parse_args(argv)
    result = measure(args.duration, args.clients, args.workers, args.v2, args.log)
    print(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 and result["old_answers_after_default_answered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
