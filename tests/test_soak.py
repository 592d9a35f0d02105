"""`make soak`'s arithmetic: growth measured after a fixed warm-up, and a run too short to measure refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.run import MIN_MEASURED_S, WARMUP_S, MemoryLog


def memory_log(samples: list[tuple[float, int, float]]) -> MemoryLog:
    """A MemoryLog holding (seconds since start, pid, RSS in MiB) samples, as its thread would have taken them."""
    log = MemoryLog(server=None, path=Path("unused.csv"))  # type: ignore[arg-type]
    log.rows = [
        {"time": 1000.0 + t, "pid": pid, "role": "worker", "rss": mib * 2**20, "cpu_seconds": 0.0}
        for t, pid, mib in samples
    ]
    return log


def test_growth_is_measured_from_the_end_of_the_warm_up_whatever_the_run_length() -> None:
    # RSS climbs 140 -> 170 MiB over the first 20 s (the first requests' allocations), then stays level: no leak.
    level = [(t, 1, min(170.0, 140.0 + 1.5 * t)) for t in range(0, 120, 2)]
    growth = memory_log(level).growth(warmup=WARMUP_S)["1"]
    assert growth["start_mib"] == 170.0 and growth["growth"] == 0.0
    # A real leak after the warm-up is seen: 170 -> 180 MiB.
    leak = [(t, 1, 170.0 + (10.0 * (t - 30) / 88 if t >= 30 else 0.0)) for t in range(0, 120, 2)]
    assert memory_log(leak).growth(warmup=WARMUP_S)["1"]["growth"] > 0.05


def test_a_run_shorter_than_the_warm_up_measures_nothing() -> None:
    assert memory_log([(t, 1, 140.0 + t) for t in range(0, 28, 2)]).growth(warmup=WARMUP_S) == {}


def test_a_soak_too_short_to_measure_is_refused_before_it_starts() -> None:
    command = [sys.executable, "-m", "loadtest.run", "--soak", "--time", "30"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "too short to measure" in result.stderr and f"at least {WARMUP_S + MIN_MEASURED_S:g} s" in result.stderr
