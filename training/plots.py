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
