"""Training loop: whole-dataset tensors, batch-level augmentation, best-by-validation checkpointing.

Fast on purpose: the dataset stays a uint8 tensor (on the GPU when training there), batches are index slices of
it, and augmentation is one ``affine_grid``/``grid_sample`` call per batch — no DataLoader, no per-sample PIL work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training.data import MNIST, MNIST_MEAN, MNIST_STD, load_mnist, normalise
from training.evaluate import evaluate_model
from training.models import build, count_parameters

log = logging.getLogger(__name__)

RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run's outcome (stored with the checkpoint and in the ONNX metadata)."""

    model: str = "cnn"
    model_args: dict = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = True
    max_shift: float = 2.0  # pixels
    max_rotate: float = 10.0  # degrees
    max_scale: float = 0.1  # relative
    patience: int = 5
    val_size: int = 5000
    train_subset: int | None = None
    seed: int = 0


# Default recipes, chosen for accuracy per second of CPU (see docs/training.md for the measurements).
DEFAULT_RECIPES: dict[str, dict] = {
    "cnn": dict(model_args={"channels": [16, 32], "hidden": 128, "dropout": 0.3}, epochs=15),
    "mlp": dict(model_args={"hidden": [400, 400], "dropout": 0.5}, epochs=30, lr=1e-3, weight_decay=0.0),
    "cnn-tiny": dict(model_args={}, epochs=12, lr=1e-2, weight_decay=0.0, label_smoothing=0.0),
}


def default_recipe(model: str, **overrides: object) -> Recipe:
    """The default recipe for ``model`` with ``overrides`` (None values are ignored)."""
    if model not in DEFAULT_RECIPES:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(DEFAULT_RECIPES)}")
    fields = {"model": model, **DEFAULT_RECIPES[model]}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe(**fields)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error naming the problem."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}; choose auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def augment(images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random shift, rotation and scale of a whole batch [N, 1, 28, 28] in [0, 1], in one grid_sample call."""
    n, device = images.shape[0], images.device

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=device) * 2 - 1) * limit

    angle = uniform(math.radians(recipe.max_rotate))
    scale = 1 + uniform(recipe.max_scale)
    shift = torch.stack([uniform(recipe.max_shift), uniform(recipe.max_shift)], dim=1) * (2 / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Zero padding is the black background, so augmentation runs before normalisation.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def configure_cpu_threads() -> int:
    """Use every core for intra-op work; one inter-op thread avoids oversubscription on small machines."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # raises if already set once in this process
        torch.set_num_interop_threads(1)
    return threads


def _versions() -> dict[str, str]:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict


def train(
    recipe: Recipe,
    device: torch.device,
    data: MNIST | None = None,
    runs_dir: Path = RUNS_DIR,
    command: str = "",
) -> RunResult:
    """Train ``recipe`` on ``device``; write checkpoint, metrics.json and plots into a new run directory."""
    torch.manual_seed(recipe.seed)
    if device.type == "cpu":
        configure_cpu_threads()
    data = (data or load_mnist(val_size=recipe.val_size, seed=recipe.seed, train_subset=recipe.train_subset)).to(device)
    model = build(recipe.model, **recipe.model_args).to(device)
    use_amp = device.type == "cuda"
    if use_amp and recipe.model != "mlp":
        model = model.to(memory_format=torch.channels_last)  # tensor cores want NHWC for convolutions

    steps_per_epoch = math.ceil(len(data.train_images) / recipe.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.25
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)

    run_id = f"{recipe.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    checkpoint_path = run_dir / "best.pt"

    history: list[dict] = []
    best_acc, best_epoch, since_best = -1.0, 0, 0
    start = time.perf_counter()
    epochs = tqdm(range(1, recipe.epochs + 1), desc=f"train {recipe.model}", unit="epoch", file=sys.stderr)
    for epoch in epochs:
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(data.train_images), generator=generator, device=device)
        total_loss, seen = torch.zeros((), device=device), 0
        batches = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False, unit="batch", file=sys.stderr)
        for step in batches:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = data.train_images[idx].unsqueeze(1).float() / 255.0
            if recipe.augment:
                x = augment(x, recipe, generator)
            x = normalise(x)
            if use_amp and recipe.model != "mlp":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model(x), data.train_labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += loss.detach() * len(idx)  # stays on the device: no sync per step
            seen += len(idx)
        val = evaluate_model(model, data.val_images, data.val_labels, device)
        row = {
            "epoch": epoch,
            "train_loss": (total_loss / seen).item(),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": schedule.get_last_lr()[0],
            "seconds": time.perf_counter() - epoch_start,
        }
        history.append(row)
        epochs.set_postfix(loss=f"{row['train_loss']:.4f}", val_acc=f"{row['val_accuracy']:.4f}")
        log.info("epoch %d %s", epoch, json.dumps(row))
        if val["accuracy"] > best_acc:
            best_acc, best_epoch, since_best = val["accuracy"], epoch, 0
            _save_checkpoint(checkpoint_path, model, recipe, run_id, command)
        else:
            since_best += 1
            if since_best >= recipe.patience:
                log.info("early stop: no validation improvement for %d epochs", recipe.patience)
                break
    train_seconds = time.perf_counter() - start

    # The test set is used once, here, on the checkpoint chosen by validation accuracy.
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    test = evaluate_model(model, data.test_images, data.test_labels, device)
    metrics = {
        "run_id": run_id,
        "command": command,
        "model": recipe.model,
        "model_args": recipe.model_args,
        "parameters": count_parameters(model),
        "recipe": asdict(recipe),
        "history": history,
        "best_epoch": best_epoch,
        "best_val_accuracy": best_acc,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "train_seconds": train_seconds,
        "device": device.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "data_sha256": data.sha256,
    }
    checkpoint["metrics"] = {k: metrics[k] for k in ("best_val_accuracy", "best_epoch", "test_accuracy")}
    checkpoint["data_sha256"] = data.sha256
    torch.save(checkpoint, checkpoint_path)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from training.plots import plot_confusion, plot_curves

    plot_curves(history, run_dir / "curves.png", title=run_id)
    plot_confusion(test["confusion_matrix"], run_dir / "confusion.png", title=f"{run_id} test set")
    return RunResult(run_dir=run_dir, checkpoint=checkpoint_path, metrics=metrics)


def _save_checkpoint(path: Path, model: nn.Module, recipe: Recipe, run_id: str, command: str) -> None:
    # Plain containers and tensors only, so torch.load(weights_only=True) can read it back safely.
    state = {
        k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }
    torch.save(
        {
            "arch": recipe.model,
            "model_args": recipe.model_args,
            "state_dict": state,
            "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
            "recipe": asdict(recipe),
            "run_id": run_id,
            "command": command,
        },
        path,
    )
