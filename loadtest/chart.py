"""Charts of a load run: throughput and latency percentiles over time from Locust's stats history CSV,
and worker memory over time from the run's memory samples."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt


def number(value: str) -> float:
    """A number from Locust's CSVs; NaN for its "N/A" (no response yet)."""
    try:
        return float(value)
    except ValueError:
        return float("nan")  # Locust writes "N/A" before the first response


def read_history(path: Path) -> list[dict[str, str]]:
    """The "Aggregated" rows of `<prefix>_stats_history.csv`: one per second, all endpoints together."""
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row["Name"] == "Aggregated"]


def plot_history(history_csv: Path, png: Path, title: str, memory_csv: Path | None = None) -> Path:
    """Requests/s, failures/s and p50/p95/p99 latency (Locust's rolling 10 s window) against seconds elapsed."""
    rows = read_history(history_csv)
    if not rows:
        raise ValueError(f"{history_csv} has no Aggregated rows: did the run send any request?")
    t0 = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - t0 for r in rows]
    panels = 3 if memory_csv and memory_csv.exists() else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels), sharex=True)
    axes[0].plot(seconds, [number(r["Requests/s"]) for r in rows], label="requests/s")
    axes[0].plot(seconds, [number(r["Failures/s"]) for r in rows], label="failures/s", color="tab:red")
    users = axes[0].twinx()
    users.plot(seconds, [number(r["User Count"]) for r in rows], color="grey", linestyle=":", label="users")
    users.set_ylabel("users")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper left")
    axes[0].set_title(title)
    for pct, style in (("50%", "-"), ("95%", "--"), ("99%", ":")):
        axes[1].plot(seconds, [number(r[pct]) for r in rows], linestyle=style, label=f"p{pct[:-1]}")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(loc="upper left")
    if panels == 3:
        _plot_memory(axes[2], memory_csv, t0)
    axes[-1].set_xlabel("seconds since the first request")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _plot_memory(ax: plt.Axes, memory_csv: Path, t0: int) -> None:
    with open(memory_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for pid in sorted({r["pid"] for r in rows if r["role"] == "worker"}):
        mine = [r for r in rows if r["pid"] == pid]
        ax.plot([float(r["time"]) - t0 for r in mine], [int(r["rss"]) / 2**20 for r in mine], label=f"worker {pid}")
    ax.set_ylabel("RSS (MiB)")
    ax.legend(loc="upper left")
