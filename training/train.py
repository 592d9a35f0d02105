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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training.data import MNIST, MNIST_MEAN, MNIST_STD, load_mnist, normalise
from training.evaluate import evaluate_model
from training.models import build, count_parameters

log = logging.getLogger(__name__)
# Where a run writes, said as it starts (the CLI shows it): known even if the run is stopped before its summary.
run_log = logging.getLogger(f"{__name__}.run")

RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"
# The score behind "not a digit" (see training/calibrate.py and docs/training.md for the comparison).
OOD_SCORE = "max_probability"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run's outcome (stored with the checkpoint and in the ONNX metadata)."""

    model: str = "cnn"
    model_args: dict = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    max_shift: float = 2.0  # pixels
    max_rotate: float = 30.0  # degrees; angle = max_rotate * u**3, u uniform in [-1, 1]: small angles more often
    max_scale: float = 0.1  # relative
    max_thickness: float = 1.0  # strength of a 3x3 grey dilation (> 0) or half-strength erosion (< 0)
    elastic: float = 1.5  # standard deviation of the elastic displacement, pixels (0: off)
    low_res: float = 0.0  # share of images seen at a low resolution: coarse grid, 16 grey levels, blown up
    drawn_shapes: bool = True  # hand-drawn shapes among the outliers (training/shapes.py; since 2026-12-04)
    outliers: int = 30000  # non-digit images for outlier exposure (0: off); see training/outliers.py
    outlier_batch: int = 16  # of them in every batch, besides batch_size digits
    outlier_weight: float = 0.5  # weight of the uniform-output loss on them (Hendrycks et al. 2019)
    pairs: int = 0  # more outliers: two training digits touching, made into one image (0: none); see outliers.py
    ema: float = 0.998  # decay per step of an exponential moving average of the weights (0: off)
    patience: int = 5
    val_size: int = 5000
    train_subset: int | None = None
    seed: int = 0
    split_seed: int | None = None  # seed of the validation split (None: `seed`); teachers and student share one
    # Knowledge distillation (Hinton et al. 2015): checkpoints whose mean logits teach this run (empty: off).
    teachers: tuple[str, ...] = ()
    distill_weight: float = 0.9  # share of the digit loss that matches the teachers (the rest: the labels)
    distill_temperature: float = 4.0  # softens both sides, so the teachers' second choices carry weight

    def validation_seed(self) -> int:
        """The seed of the validation split: runs that share it never train on one another's validation digits."""
        return self.seed if self.split_seed is None else self.split_seed


# Default recipes, chosen for accuracy per second of CPU (see docs/training.md for the measurements).
DEFAULT_RECIPES: dict[str, dict] = {
    # `--pairs 10000 --epochs 30` is the touching-pairs variant: measured, not the default (docs/training.md).
    # low_res 0.1: blocky low-resolution digits (8x8 scans blown up) read right (docs/training.md, "Last mile").
    "cnn": dict(model_args={"channels": [24, 48], "hidden": 128, "dropout": 0.3}, epochs=18, low_res=0.1),
    # The MLP has no built-in tolerance to shifts and warps: with the CNN's 30 degrees and elastic distortion (and
    # outlier exposure) it reached 98.42% test accuracy, below the earlier recipe's 98.77%, so it keeps milder ones.
    "mlp": dict(
        model_args={"hidden": [400, 400], "dropout": 0.5},
        epochs=30,
        lr=1e-3,
        weight_decay=0.0,
        max_rotate=10.0,
        elastic=0.0,
        max_thickness=0.5,
    ),
    "cnn-tiny": dict(model_args={}, epochs=12, lr=1e-2, weight_decay=0.0),
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


def thickness(images: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Thicker (strength > 0) or thinner (< 0) strokes: a blend towards a 3x3 grey dilation or erosion.

    Preprocessing centres and scales a digit but cannot make a felt-tip stroke as thin as a pencil's. Erosion
    runs at half strength: MNIST strokes are 2-3 px wide, and a full 3x3 erosion erases the thin ones.
    """
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    s = strength.view(-1, 1, 1, 1)
    return torch.where(s >= 0, images + s * (dilated - images), images + 0.5 * -s * (eroded - images))


def augment(images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Stroke thickness, then shift, rotation, scale and elastic distortion of a whole batch [N, 1, 28, 28] in
    [0, 1]: one max-pool pair and one grid_sample call for the batch."""
    n, device = images.shape[0], images.device

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=device) * 2 - 1) * limit

    if recipe.max_thickness > 0:
        images = thickness(images, uniform(recipe.max_thickness))
    angle = uniform(1.0) ** 3 * math.radians(recipe.max_rotate)
    scale = 1 + uniform(recipe.max_scale)
    shift = torch.stack([uniform(recipe.max_shift), uniform(recipe.max_shift)], dim=1) * (2 / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if recipe.elastic > 0:
        # Elastic distortion (Simard et al. 2003) made cheap: random displacements on a 4x4 lattice, smoothly
        # interpolated to every pixel, added to the affine grid. Each image gets its own strength in [0, 1].
        coarse = torch.randn(n, 2, 4, 4, generator=generator, device=device)
        coarse = coarse * torch.rand(n, 1, 1, 1, generator=generator, device=device) * (recipe.elastic * 2 / 28)
        grid = grid + F.interpolate(coarse, size=(28, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    # Zero padding is the black background, so augmentation runs before normalisation.
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if recipe.low_res > 0:
        images = low_resolution(images, recipe.low_res, generator)
    return images


def low_resolution(images: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """`share` of the images as a low-resolution copy would show them: averaged down to a coarse grid (8-14
    cells across the 28x28 image, so 6-10 across the digit), 16 grey levels, and blown up again, blocky
    (nearest) or smoothed (bilinear), one grid and one blow-up per batch.

    Digit scans stored at 8x8 (UCI's optdigits, scikit-learn's `load_digits`), thumbnails and screenshots of
    them reach the service as blocks that MNIST's anti-aliased strokes never look like: the shipped CNN read 66%
    of MNIST test digits right through an 8x8 grid blown up blocky, 96% through the same grid smoothed.
    """
    n, device = images.shape[0], images.device
    cells = int(torch.randint(8, 15, (1,), generator=generator, device=device))
    mode = "nearest-exact" if float(torch.rand((), generator=generator, device=device)) < 0.6 else "bilinear"
    coarse = F.adaptive_avg_pool2d(images, cells)
    peak = coarse.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    coarse = torch.round(coarse / peak * 15) / 15
    blown = F.interpolate(
        coarse, size=images.shape[-2:], mode=mode, align_corners=None if mode != "bilinear" else False
    )
    pick = torch.rand(n, 1, 1, 1, generator=generator, device=device) < share
    return torch.where(pick, blown, images)


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
    data = data or load_mnist(val_size=recipe.val_size, seed=recipe.validation_seed(), train_subset=recipe.train_subset)
    data = data.to(device)
    model = build(recipe.model, **recipe.model_args).to(device)
    use_amp = device.type == "cuda"
    # NHWC for convolutions: tensor cores want it on a GPU, and oneDNN's CPU kernels too (a CNN step 1.38x faster
    # on the 2-core machine, measured: 125 against 173 ms).
    channels_last = recipe.model != "mlp"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = load_teachers(recipe, device, channels_last) if recipe.teachers else None

    steps_per_epoch = math.ceil(len(data.train_images) / recipe.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.25
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    # The average of the last few hundred steps' weights (batch-norm statistics included) lands nearer the centre of
    # the low-loss region than the last step does; it is a candidate for the checkpoint beside the raw weights.
    ema = None
    if recipe.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    outliers = None
    if recipe.outliers > 0:
        from training.outliers import training_outliers

        # No more than there are digits: a 5,000-image quick run does not need (or wait for) 30,000 of them.
        count = min(recipe.outliers, len(data.train_images))
        pool = [training_outliers(count, seed=recipe.seed, drawn_shapes=recipe.drawn_shapes)]
        if recipe.pairs > 0:
            from training.outliers import touching_pairs

            digits = data.train_images.cpu().numpy()  # training digits only: validation and test stay unseen
            pool.append(touching_pairs(digits, min(recipe.pairs, len(digits)), seed=recipe.seed))
        outliers = torch.from_numpy(np.concatenate(pool)).to(device)

    run_dir = _new_run_dir(runs_dir, f"{recipe.model}-{datetime.now():%Y%m%d-%H%M%S}")
    run_id = run_dir.name
    run_log.info("writing %s", run_dir)
    checkpoint_path = run_dir / "best.pt"

    history: list[dict] = []
    best_acc, best_epoch, best_weights = -1.0, 0, "raw"
    start, start_cpu = time.perf_counter(), time.process_time()
    epochs = tqdm(range(1, recipe.epochs + 1), desc=f"train {recipe.model}", unit="epoch", file=sys.stderr)
    for epoch in epochs:
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(data.train_images), generator=generator, device=device)
        total_loss, seen = torch.zeros((), device=device), 0
        batches = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False, unit="batch", file=sys.stderr)
        for step in batches:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = data.train_images[idx]
            if outliers is not None:  # digits and non-digits share one forward pass (and batch norm statistics)
                pick = torch.randint(len(outliers), (recipe.outlier_batch,), generator=generator, device=device)
                x = torch.cat([x, outliers[pick]])
            x = x.unsqueeze(1).float() / 255.0
            if recipe.augment:
                x = augment(x, recipe, generator)
            x = normalise(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x).float()
                labels = data.train_labels[idx]
                if teacher is None:
                    loss = loss_fn(logits[: len(idx)], labels)
                else:
                    with torch.no_grad():
                        taught = teacher(x[: len(idx)]).float()
                    loss = distill_loss(
                        logits[: len(idx)], taught, labels, recipe.distill_weight, recipe.distill_temperature, loss_fn
                    )
                if outliers is not None:
                    loss = loss + recipe.outlier_weight * uniform_loss(logits[len(idx) :])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += loss.detach() * len(idx)  # stays on the device: no sync per step
            seen += len(idx)
        val = evaluate_model(model, data.val_images, data.val_labels, device)
        weights, best_model = "raw", model
        if ema is not None:
            val_ema = evaluate_model(ema.module, data.val_images, data.val_labels, device)
            if val_ema["accuracy"] > val["accuracy"]:
                val, weights, best_model = val_ema, "ema", ema.module
        row = {
            "epoch": epoch,
            "train_loss": (total_loss / seen).item(),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": schedule.get_last_lr()[0],
            "weights": weights,  # the better of the raw and the averaged weights on validation
            "seconds": time.perf_counter() - epoch_start,
        }
        history.append(row)
        epochs.set_postfix(loss=f"{row['train_loss']:.4f}", val_acc=f"{row['val_accuracy']:.4f}")
        log.info("epoch %d %s", epoch, json.dumps(row))
        if val["accuracy"] > best_acc:
            best_acc, best_epoch, best_weights = val["accuracy"], epoch, weights
            _save_checkpoint(checkpoint_path, best_model, recipe, run_id, command)
        elif stop_early(epoch, best_epoch, recipe):
            log.info("early stop: no validation improvement for %d epochs", recipe.patience)
            break
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - start_cpu  # all threads: the CPU the run really used

    # The test set is used once, here, on the checkpoint chosen by validation accuracy.
    # On the CPU: the file is saved again below and must stay loadable on a machine without the GPU it came from.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    calibration = calibrate(model, data, recipe, device)
    test = evaluate_model(model, data.test_images, data.test_labels, device, calibration["temperature"])
    metrics = {
        "run_id": run_id,
        "command": command,
        "model": recipe.model,
        "model_args": recipe.model_args,
        "parameters": count_parameters(model),
        "recipe": asdict(recipe),
        "history": history,
        "best_epoch": best_epoch,
        "best_weights": best_weights,
        "best_val_accuracy": best_acc,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "calibration": calibration,
        "test_ece": test["ece"],
        "test_ece_uncalibrated": test["ece_uncalibrated"],
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "device": device.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "data_sha256": data.sha256,
    }
    checkpoint["metrics"] = {k: metrics[k] for k in ("best_val_accuracy", "best_epoch", "test_accuracy")}
    checkpoint["calibration"] = calibration
    checkpoint["data_sha256"] = data.sha256
    torch.save(checkpoint, checkpoint_path)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from training.plots import plot_confusion, plot_curves

    plot_curves(history, run_dir / "curves.png", title=run_id)
    plot_confusion(test["confusion_matrix"], run_dir / "confusion.png", title=f"{run_id} test set")
    return RunResult(run_dir=run_dir, checkpoint=checkpoint_path, metrics=metrics)


def _new_run_dir(runs_dir: Path, run_id: str) -> Path:
    """runs/<run_id>/, or <run_id>-2/, -3/... when runs started in the same second (several at once on a GPU)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = runs_dir / (run_id if n == 1 else f"{run_id}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory for {run_id} in {runs_dir}")


def stop_early(epoch: int, best_epoch: int, recipe: Recipe) -> bool:
    """Whether `recipe.patience` epochs have passed without a new best, counting only the schedule's second half.

    While the one-cycle rate is high, validation stalls and jumps, and the gains come as it anneals: a 24-epoch run
    that counted from the start stopped at epoch 13 at 99.22% validation (measured).
    """
    return epoch - max(best_epoch, recipe.epochs // 2) >= recipe.patience


def load_teachers(recipe: Recipe, device: torch.device, channels_last: bool) -> nn.Module:
    """The teachers' checkpoints as one frozen model that returns their mean logits.

    Each teacher must have held out the student's validation digits (same split seed, size and subset): a teacher
    that trained on them would leak them into the student's checkpoint choice, temperature and thresholds.
    """
    from training.evaluate import load_ensemble

    teacher, checkpoints = load_ensemble([Path(p) for p in recipe.teachers], device.type)
    for path, checkpoint in zip(recipe.teachers, checkpoints, strict=True):
        theirs = Recipe(**checkpoint["recipe"])
        split = (theirs.validation_seed(), theirs.val_size, theirs.train_subset)
        if split != (recipe.validation_seed(), recipe.val_size, recipe.train_subset):
            raise ValueError(
                f"teacher {path} held out another validation split (seed, size, subset {split}) than this run "
                f"({recipe.validation_seed()}, {recipe.val_size}, {recipe.train_subset}): train teachers and "
                "student with the same --split-seed"
            )
    if channels_last:  # load_ensemble put it on `device`, in eval mode
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.requires_grad_(False)


def distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float,
    label_loss: nn.Module,
) -> torch.Tensor:
    """The labels' loss blended with KL(teacher || student) at a temperature T, scaled by T^2 so that its gradients
    keep their size as T changes (Hinton et al. 2015). The teachers see the same augmented batch as the student.
    A student's `train_loss` is this blend, so it is not comparable with a plain run's."""
    t = temperature
    student, teacher = F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1)
    matched = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return (1 - weight) * label_loss(logits, labels) + weight * t * t * matched


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform || softmax(logits)), averaged: zero when a non-digit gets 10% for every digit."""
    return -(F.log_softmax(logits, dim=1).mean(dim=1) + math.log(logits.shape[1])).mean()


def calibrate(model: nn.Module, data: MNIST, recipe: Recipe, device: torch.device) -> dict:
    """Fit the temperature and the "not a digit" threshold on the validation split (never the test set).

    The validation digits decide both; validation non-digits (training families, another seed) only report how
    well each score separates them, so the choice of score is visible in metrics.json.
    """
    from training.calibrate import (
        DIGITS_FLAGGED,
        OOD_SCORES,
        UNCERTAIN_BELOW,
        digit_score,
        ece,
        fit_temperature,
        ood_report,
        ood_threshold,
        softmax,
    )
    from training.evaluate import model_logits
    from training.outliers import training_outliers

    logits = model_logits(model, data.val_images, device)
    labels = data.val_labels.cpu().numpy()
    temperature = fit_temperature(logits, labels)
    calibrated = logits / temperature
    others = (
        model_logits(
            model,
            torch.from_numpy(training_outliers(2000, seed=recipe.seed + 1, drawn_shapes=recipe.drawn_shapes)),
            device,
        )
        / temperature
    )
    separation = {}
    for kind in OOD_SCORES:
        digits = digit_score(calibrated, kind)
        separation[kind] = ood_report(digits, digit_score(others, kind), ood_threshold(digits, DIGITS_FLAGGED))
    kind = OOD_SCORE
    return {
        "temperature": temperature,
        "val_ece_uncalibrated": ece(softmax(logits), labels),
        "val_ece": ece(softmax(calibrated), labels),
        "ood_score": kind,
        "ood_threshold": separation[kind]["threshold"],
        "uncertain_threshold": UNCERTAIN_BELOW,
        "validation_separation": separation,
    }


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
