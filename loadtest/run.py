"""Run the Locust load test headless, bounded in users and time, and write a results folder.

    .venv/bin/python -m loadtest.run                     # starts `bentoml serve` on a free local port
    .venv/bin/python -m loadtest.run --url http://127.0.0.1:3000 --users 32 --time 120
    .venv/bin/python -m loadtest.run --soak --time 300   # memory per worker after a 30 s warm-up and at the end

Writes loadtest/results/<timestamp>/: locust_*.csv (Locust's stats, history, failures), report.html,
chart.png (throughput and p50/p95/p99 over time; worker memory when the server is local), memory.csv,
server.log, locust.log and summary.json. Exit status 0 only when no request failed (HTTP error or wrong
digit) and, for a soak, no worker grew by more than --max-growth between the end of a fixed warm-up and the end.
A soak shorter than the warm-up plus MIN_MEASURED_S is refused: it would measure the warm-up itself (30 s runs grew
6.6% that way, all of it the first requests' allocations). Server settings come from the usual MNIST_* environment
variables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.chart import number, plot_history
from loadtest.digits import EXIT_CALIBRATION
from loadtest.server import REPO, LocalServer

# The first requests allocate for good (ONNX Runtime's arena, Pillow's and numpy's buffers, BentoML's timers):
# memory rises for the first seconds of load, then levels off (docs/benchmarks.md, "Soak"). Growth is measured
# from the end of this warm-up, the same for every run length, over at least MIN_MEASURED_S of load.
WARMUP_S = 30.0
MIN_MEASURED_S = 60.0
RESULTS = REPO / "loadtest" / "results"
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


class MemoryLog:
    """Samples RSS and CPU time of every server process every `interval` seconds into a CSV, in a thread."""

    def __init__(self, server: LocalServer, path: Path, interval: float = 2.0) -> None:
        self.server, self.path, self.interval = server, path, interval
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.rows += [{"time": now, **s.__dict__} for s in self.server.sample()]
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["time", "pid", "role", "rss", "cpu_seconds"])
            writer.writeheader()
            writer.writerows(self.rows)

    def growth(self, warmup: float) -> dict[str, dict[str, float]]:
        """Per worker: RSS (MiB) at the first sample after `warmup` seconds of load and at the last sample.

        The baseline is taken after a warm-up because the first requests allocate for good (ONNX Runtime's
        arena, Pillow's and numpy's buffers): that is start-up cost, not a leak. A worker with no sample after the
        warm-up (a run shorter than it) is left out: there is nothing to measure.
        """
        by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in self.rows:
            if row["role"] == "worker":
                by_pid[row["pid"]].append(row)
        out = {}
        for pid, rows in by_pid.items():
            t0 = rows[0]["time"]
            settled = [r for r in rows if r["time"] - t0 >= warmup]
            if len(settled) < 2:
                continue
            start, end = settled[0]["rss"] / 2**20, rows[-1]["rss"] / 2**20
            out[str(pid)] = {"start_mib": round(start, 1), "end_mib": round(end, 1), "growth": end / start - 1}
        return out


def locust_summary(prefix: Path) -> dict[str, Any]:
    """Totals of the run from Locust's CSVs: requests, failures (wrong answers apart), req/s, percentiles."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    wrong = sum(int(r["Occurrences"]) for r in failures if "wrong" in r["Error"])
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "wrong_answers": wrong,
        "requests_per_s": round(number(total["Requests/s"]), 1),
        "p50_ms": number(total["50%"]),
        "p95_ms": number(total["95%"]),
        "p99_ms": number(total["99%"]),
        "failure_kinds": [f"{r['Occurrences']} x {r['Name']}: {r['Error']}" for r in failures],
    }


def run_locust(url: str, users: int, spawn_rate: float, seconds: int, pause: float, out: Path) -> int:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{seconds}s", "--stop-timeout", "10",
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"), "--only-summary",
    ]  # fmt: skip
    with open(out / "locust.log", "wb") as log:
        env = {**os.environ, "LOADTEST_MAX_PAUSE": str(pause)}
        return subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server to load (default: start `bentoml serve` locally on a free port)")
    parser.add_argument("--users", type=int, default=16, help="concurrent simulated users (default 16)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    parser.add_argument("--time", type=int, help="seconds of load (default 60; 300 with --soak)")
    parser.add_argument("--pause", type=float, default=0.3, help="most seconds a user waits between requests")
    parser.add_argument("--soak", action="store_true", help="a soak run: fail if a worker's memory grows")
    parser.add_argument("--max-growth", type=float, default=0.05, help="soak: allowed RSS growth (default 0.05)")
    parser.add_argument(
        "--warmup", type=float, default=WARMUP_S, help=f"seconds of load before memory is measured ({WARMUP_S:g})"
    )
    parser.add_argument("--out", type=Path, help="results folder (default loadtest/results/<timestamp>)")
    args = parser.parse_args(argv)
    seconds = args.time or (300 if args.soak else 60)
    if args.soak and seconds < args.warmup + MIN_MEASURED_S:
        print(
            f"a soak of {seconds} s is too short to measure: memory growth is measured after a {args.warmup:g} s "
            f"warm-up, over at least {MIN_MEASURED_S:g} s, so it needs --time (SOAK_DURATION) of at least "
            f"{args.warmup + MIN_MEASURED_S:g} s",
            file=sys.stderr,
        )
        return 2
    out = args.out or RESULTS / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {"users": args.users, "seconds": seconds, "pause": args.pause, "soak": args.soak}
    memory: MemoryLog | None = None
    if args.url:
        summary["url"] = args.url.rstrip("/")
        code = run_locust(summary["url"], args.users, args.spawn_rate, seconds, args.pause, out)
    else:
        with LocalServer(log_path=out / "server.log") as server:
            summary["url"] = server.url
            summary["startup_s"] = round(server.startup_seconds or 0.0, 2)
            with MemoryLog(server, out / "memory.csv") as memory:
                code = run_locust(server.url, args.users, args.spawn_rate, seconds, args.pause, out)
    summary["locust_exit_code"] = code
    if not (out / "locust_stats.csv").exists():
        print(f"Locust wrote no stats (exit {code}); see {out / 'locust.log'}", file=sys.stderr)
        return code or 1
    summary.update(locust_summary(out / "locust"))
    passed = code == 0 and summary["failures"] == 0 and summary["requests"] > 0
    if code == EXIT_CALIBRATION:
        print(f"calibration failed before any load (wrong model or answers); see {out / 'locust.log'}", file=sys.stderr)
    if memory is not None:
        summary["warmup_s"] = args.warmup
        summary["memory"] = memory.growth(warmup=args.warmup)
        summary["max_growth"] = max((w["growth"] for w in summary["memory"].values()), default=0.0)
        if args.soak:
            measured = bool(summary["memory"])
            if not measured:
                print("no worker memory sampled after the warm-up: growth not measured", file=sys.stderr)
            passed = passed and measured and summary["max_growth"] <= args.max_growth
    summary["passed"] = passed
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["requests"]:
        plot_history(
            out / "locust_stats_history.csv",
            out / "chart.png",
            f"{'soak' if args.soak else 'load'}: {args.users} users, {seconds} s, {summary['url']}",
            out / "memory.csv" if memory is not None else None,
        )
    print(report(summary, out))
    return 0 if passed else 1


def report(summary: dict[str, Any], out: Path) -> str:
    lines = [
        f"{summary['requests']} requests in {summary['seconds']} s from {summary['users']} users: "
        f"{summary['requests_per_s']} req/s, p50 {summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms, "
        f"p99 {summary['p99_ms']:.0f} ms",
        f"failures: {summary['failures']} (wrong answers: {summary['wrong_answers']})",
        *(f"  {kind}" for kind in summary["failure_kinds"][:10]),
    ]
    if "startup_s" in summary:
        lines.append(f"server start-up to ready: {summary['startup_s']} s")
    for pid, w in summary.get("memory", {}).items():
        lines.append(
            f"worker {pid}: RSS {w['start_mib']} MiB after the {summary['warmup_s']:g} s warm-up -> "
            f"{w['end_mib']} MiB at the end "
            f"({100 * w['growth']:+.1f} %)"
        )
    lines += [f"{'PASSED' if summary['passed'] else 'FAILED'}; results in {out}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
