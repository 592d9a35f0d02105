"""What one core serves, per kind of request, and what one worker holds in memory: the inputs of the capacity plan
(docs/kubernetes.md, "Capacity plan"). `make capacity`.

A real `bentoml serve` (MNIST_WORKERS workers) under a steady load of one kind of request at a time, from client
threads on the same machine. Throughput per core is the requests answered divided by the CPU seconds the server's
processes spent (user + system, read from /proc by psutil): the clients' own CPU, and anything else running on the
machine, are not counted, so the figure is what a core of a pod gives, not what this shared machine's wall clock
gives. Memory is each worker's resident set, idle after start-up and at its peak under each load (sampled every
0.2 s).

Kinds: a 28x28 MNIST PNG to /predict (what the browser page and most clients send), a phone photo (12 MP JPEG,
4032x3024) to /predict, and a photographed number to /read (examples/number.jpg, 4 digits).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image, ImageFilter

from loadtest.server import REPO, LocalServer

EXAMPLES = REPO / "examples"
# Replicas are planned to run at this share of their CPU: headroom for bursts, and for the autoscaler's reaction time.
TARGET_UTILISATION = 0.6
TARGETS = (1_000, 10_000, 100_000)  # requests per second


@dataclass(frozen=True)
class Kind:
    name: str
    route: str
    data: bytes
    filename: str
    content_type: str


def phone_photo() -> bytes:
    """The example photo of a digit at a phone camera's resolution (12 MP), with sensor-like noise, as JPEG q=90:
    about what a phone uploads."""
    small = Image.open(EXAMPLES / "photo.jpg").convert("RGB")
    big = small.resize((4032, 3024), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = np.random.default_rng(0).normal(0, 4, (3024, 4032, 3))
    pixels = np.clip(np.asarray(big, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def kinds() -> list[Kind]:
    return [
        Kind("28x28 PNG, /predict", "/predict", (EXAMPLES / "digit.png").read_bytes(), "digit.png", "image/png"),
        Kind("phone photo 12 MP JPEG, /predict", "/predict", phone_photo(), "photo.jpg", "image/jpeg"),
        Kind("number photo, /read", "/read", (EXAMPLES / "number.jpg").read_bytes(), "number.jpg", "image/jpeg"),
    ]


def load(url: str, kind: Kind, clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` threads sending `kind` without pause for `seconds`: each answer's latency, and the failures."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        files = {"image": (kind.filename, kind.data, kind.content_type)}
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                ok = session.post(url + kind.route, files=files, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                latencies[k].append(time.perf_counter() - start)
            else:
                failures[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for row in latencies for x in row], sum(failures)


def server_cpu(server: LocalServer) -> float:
    return sum(sample.cpu_seconds for sample in server.sample())


def peak_rss(server: LocalServer, stop: threading.Event, peaks: dict[int, int]) -> None:
    while not stop.is_set():
        for sample in server.workers():
            peaks[sample.pid] = max(peaks.get(sample.pid, 0), sample.rss)
        stop.wait(0.2)


def measure(workers: int, clients: int, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {"workers": workers, "clients": clients, "seconds_per_kind": seconds, "kinds": {}}
    with LocalServer(env={"MNIST_WORKERS": str(workers)}) as server:
        time.sleep(1.0)
        results["idle_rss_mib_per_worker"] = [round(s.rss / 2**20) for s in server.workers()]
        for kind in kinds():
            load(server.url, kind, clients, min(2.0, seconds))  # warm-up: first-use allocations, caches
            peaks: dict[int, int] = {}
            stop = threading.Event()
            sampler = threading.Thread(target=peak_rss, args=(server, stop, peaks))
            sampler.start()
            cpu_before, start = server_cpu(server), time.perf_counter()
            latencies, failures = load(server.url, kind, clients, seconds)
            wall, cpu = time.perf_counter() - start, server_cpu(server) - cpu_before
            stop.set()
            sampler.join()
            ms = np.array(latencies) * 1000
            results["kinds"][kind.name] = {
                "bytes": len(kind.data),
                "requests": len(latencies),
                "failures": failures,
                "wall_requests_per_s": round(len(latencies) / wall, 1),
                "server_cpu_s": round(cpu, 2),
                "requests_per_core_s": round(len(latencies) / cpu, 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "peak_rss_mib_per_worker": sorted(round(v / 2**20) for v in peaks.values()),
            }
    results["plan"] = plan(results)
    return results


def plan(results: dict[str, Any]) -> dict[str, Any]:
    """Cores and 2-core replicas for each target rate, at TARGET_UTILISATION of each core."""
    out = {}
    for name, kind in results["kinds"].items():
        per_core = kind["requests_per_core_s"]
        rows = {}
        for target in TARGETS:
            cores = math.ceil(target / (per_core * TARGET_UTILISATION))
            rows[f"{target}/s"] = {"cores": cores, "replicas_of_2_cores": math.ceil(cores / 2)}
        out[name] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="MNIST_WORKERS (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per kind (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    results = measure(args.workers, args.clients, args.seconds)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(kind["failures"] == 0 for kind in results["kinds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
