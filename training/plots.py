"""Learning curves and confusion matrices as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Train/validation loss and validation accuracy per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss (augmented, smoothed)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", color="tab:green")
    best = max(history, key=lambda r: r["val_accuracy"])
    ax_acc.axvline(best["epoch"], color="grey", linestyle=":", label=f"best: epoch {best['epoch']}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> None:
    """Confusion matrix with counts; the diagonal is drawn on a log colour scale so errors stay visible."""
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(np.log1p(m), cmap="Blues")
    for (i, j), count in np.ndenumerate(m):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if i == j else "black")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    accuracy = np.trace(m) / m.sum()
    ax.set_title(f"{title} — accuracy {100 * accuracy:.2f}%")
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(bins: dict, path: Path, title: str) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, before and after the temperature."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    panels = (("before", "without temperature"), ("after", "shipped (calibrated)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        b = bins[key]
        edges = np.asarray(b["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = np.nan_to_num(np.asarray(b["accuracy"], dtype=float))
        confidence = np.asarray(b["confidence"], dtype=float)
        ax.bar(centres, accuracy, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy in bin")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        filled = ~np.isnan(confidence)
        # The gap between a bar's top and its red mark is that bin's miscalibration.
        ax.plot(
            centres[filled], confidence[filled], "_", color="tab:red", markersize=14, mew=2, label="mean confidence"
        )
        for x, n in zip(centres, b["counts"], strict=True):
            if n:
                ax.text(x, 0.02, str(n), rotation=90, ha="center", va="bottom", fontsize=7, color="white")
        ax.set_title(f"{label}: ECE {b['ece']:.4f}")
        ax.set_xlabel("confidence (max probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (10,000 MNIST test digits)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title}: reliability, 15 bins (counts in the bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
