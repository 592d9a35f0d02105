"""A short real training run on real MNIST (CPU), its artefacts, and the checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.data import load_mnist, normalise
from training.evaluate import evaluate_checkpoint, load_checkpoint
from training.models import Ensemble, build
from training.train import _new_run_dir, default_recipe, distill_loss, low_resolution, pick_device, stop_early, train


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory):
    recipe = default_recipe("cnn", epochs=1, train_subset=5000)
    data = load_mnist(val_size=recipe.val_size, seed=recipe.seed, train_subset=recipe.train_subset)
    return train(recipe, torch.device("cpu"), data, runs_dir=tmp_path_factory.mktemp("runs"), command="pytest")


def test_one_epoch_on_5000_images_reaches_90_percent(short_run) -> None:
    assert short_run.metrics["best_val_accuracy"] >= 0.90
    assert short_run.metrics["test_accuracy"] >= 0.90


def test_run_directory_holds_every_artefact(short_run) -> None:
    run_dir: Path = short_run.run_dir
    for name in ("best.pt", "metrics.json", "curves.png", "confusion.png"):
        assert (run_dir / name).stat().st_size > 0, name
    for name in ("curves.png", "confusion.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "history",
        "test_accuracy",
        "per_class_accuracy",
        "confusion_matrix",
        "train_seconds",
        "device",
        "versions",
        "data_sha256",
        "recipe",
        "best_epoch",
        "calibration",
        "test_ece",
        "test_ece_uncalibrated",
        "train_cpu_seconds",
    ):
        assert key in metrics, key
    assert {"train_loss", "val_loss", "val_accuracy", "seconds"} <= set(metrics["history"][0])
    assert len(metrics["per_class_accuracy"]) == 10
    assert sum(map(sum, metrics["confusion_matrix"])) == 10000
    assert metrics["device"] == "cpu"
    calibration = metrics["calibration"]
    assert calibration["temperature"] > 0 and calibration["ood_score"] == "max_probability"
    # Both scores were compared on validation digits against validation non-digits; each flags 0.5% of digits.
    for report in calibration["validation_separation"].values():
        assert report["digits_flagged"] == pytest.approx(0.005, abs=0.001) and 0 <= report["auroc"] <= 1


def test_checkpoint_loads_safely_and_reproduces_outputs(short_run) -> None:
    raw = torch.load(short_run.checkpoint, weights_only=True)  # no pickled objects allowed
    assert raw["arch"] == "cnn" and raw["normalization"] == {"mean": 0.1307, "std": 0.3081}
    model, _ = load_checkpoint(short_run.checkpoint)
    again, _ = load_checkpoint(short_run.checkpoint)
    data = load_mnist(val_size=0)
    with torch.no_grad():
        assert torch.equal(model(normalise(data.test_images[:32])), again(normalise(data.test_images[:32])))
        accuracy = (model(normalise(data.test_images)).argmax(1) == data.test_labels).float().mean().item()
    # The reloaded weights are the ones whose test accuracy the run reported.
    assert accuracy == pytest.approx(short_run.metrics["test_accuracy"], abs=1e-4)


def test_same_seed_repeats_the_run_on_the_same_device(short_run, tmp_path: Path) -> None:
    recipe = default_recipe("cnn", epochs=1, train_subset=5000)
    again = train(recipe, torch.device("cpu"), runs_dir=tmp_path, command="pytest")
    assert again.metrics["history"][0]["val_accuracy"] == short_run.metrics["history"][0]["val_accuracy"]


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def test_the_checkpoint_holds_the_weights_that_won_on_validation(tmp_path: Path) -> None:
    # A fast average (decay 0.8: about the last 5 steps), so that it can beat the raw weights in a short run (on this
    # seed it wins epoch 1; the raw weights win epoch 2, the best).
    recipe = default_recipe("cnn", epochs=2, train_subset=3000, ema=0.8)
    data = load_mnist(val_size=recipe.val_size, seed=recipe.seed, train_subset=recipe.train_subset)
    run = train(recipe, torch.device("cpu"), data, runs_dir=tmp_path, command="pytest")
    history = run.metrics["history"]
    assert {row["weights"] for row in history} <= {"raw", "ema"}
    best = history[run.metrics["best_epoch"] - 1]
    assert run.metrics["best_weights"] == best["weights"]
    model, _ = load_checkpoint(run.checkpoint)
    with torch.no_grad():
        val = (model(normalise(data.val_images)).argmax(1) == data.val_labels).float().mean().item()
    # Whichever won (raw or averaged), the file holds it: its validation accuracy is the one recorded.
    assert val == pytest.approx(run.metrics["best_val_accuracy"], abs=1e-4)


def test_early_stopping_waits_for_the_schedules_second_half() -> None:
    recipe = default_recipe("cnn", epochs=24, patience=5)
    # Best at epoch 8, five epochs without a better one by epoch 13: still the first half (the rate is high), go on.
    assert not stop_early(13, 8, recipe)
    # From epoch 12 on they count: five of them by epoch 17.
    assert not stop_early(16, 8, recipe)
    assert stop_early(17, 8, recipe)
    # A best in the second half restarts the count.
    assert not stop_early(24, 20, recipe)
    assert stop_early(23, 18, recipe)


def _row_centre(images: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(28, dtype=torch.float32).view(1, 1, 28, 1)
    return (images * rows).sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))


def test_low_resolution_blocks_a_share_of_the_batch_and_keeps_the_digit() -> None:
    """The augmentation sees digits through a coarse grid with 16 grey levels: it changes the share asked for,
    keeps pixels in [0, 1] and each digit where it was, and blows up blocky (<= 16 grey levels) or smooth."""
    digits = load_mnist(val_size=0, train_subset=256).train_images[:256].unsqueeze(1).float() / 255
    assert torch.equal(low_resolution(digits, 0.0, torch.Generator().manual_seed(0)), digits)
    changed, blocky = [], []
    for seed in range(8):
        out = low_resolution(digits, 0.5, torch.Generator().manual_seed(seed))
        assert out.min() >= 0 and out.max() <= 1
        moved = (out - digits).abs().amax(dim=(1, 2, 3)) > 0
        changed.append(moved.float().mean().item())
        assert (_row_centre(out) - _row_centre(digits)).abs().max() < 1.75  # half a cell of the coarsest grid
        blocky.append(max(torch.unique(image).numel() for image in out[moved]) <= 16)
    assert 0.35 < sum(changed) / len(changed) < 0.65
    assert any(blocky) and not all(blocky)  # both blow-ups occur


def test_a_student_learns_what_its_teacher_answers_not_the_labels(short_run, tmp_path: Path) -> None:
    """A teacher whose outputs are shifted by one (it answers 4 for a 3) teaches a student that, with distillation
    weight 1, never sees a label: the student answers as the teacher does, so the teacher really is what it learns."""
    checkpoint = torch.load(short_run.checkpoint, weights_only=True)
    last = [k for k in checkpoint["state_dict"] if k.endswith(".weight")][-1].removesuffix(".weight")
    for key in (f"{last}.weight", f"{last}.bias"):
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key].roll(1, dims=0)  # logit k <- logit k-1
    shifted = tmp_path / "shifted-teacher.pt"
    torch.save(checkpoint, shifted)
    recipe = default_recipe(
        "cnn",
        epochs=1,
        train_subset=5000,
        seed=1,
        split_seed=0,
        teachers=(str(shifted),),
        distill_weight=1.0,
        ema=0,  # else the averaged weights, nearer the initial ones, win on the true labels' validation (10% > 0%)
    )
    assert recipe.validation_seed() == 0 and default_recipe("cnn", seed=1).validation_seed() == 1
    student = train(recipe, torch.device("cpu"), runs_dir=tmp_path / "runs", command="pytest")
    assert list(student.metrics["recipe"]["teachers"]) == [str(shifted)]
    model, _ = load_checkpoint(student.checkpoint)
    data = load_mnist(val_size=0)
    with torch.no_grad():
        answers = model(normalise(data.test_images)).argmax(1)
    assert (answers == (data.test_labels + 1) % 10).float().mean() >= 0.7  # the teacher's answers; chance is 10%
    assert student.metrics["test_accuracy"] < 0.1


def test_the_distillation_loss_blends_labels_and_teacher() -> None:
    torch.manual_seed(0)
    logits, other, labels = torch.randn(32, 10), torch.randn(32, 10), torch.randint(0, 10, (32,))
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(distill_loss(logits, other, labels, 0.0, 4.0, ce), ce(logits, labels))
    # A teacher that agrees with the student adds nothing; one that disagrees adds a positive term.
    assert torch.allclose(distill_loss(logits, logits, labels, 0.9, 4.0, ce), 0.1 * ce(logits, labels))
    assert distill_loss(logits, other, labels, 0.9, 4.0, ce) > 0.1 * ce(logits, labels)


def test_a_teacher_that_trained_on_the_students_validation_digits_is_refused(short_run, tmp_path: Path) -> None:
    # The teacher held out seed 0's split; a seed-1 student without --split-seed 0 validates on other digits.
    recipe = default_recipe("cnn", epochs=1, train_subset=5000, seed=1, teachers=(str(short_run.checkpoint),))
    with pytest.raises(ValueError, match="another validation split"):
        train(recipe, torch.device("cpu"), runs_dir=tmp_path, command="pytest")


def test_an_ensemble_answers_the_mean_of_its_members_logits(short_run) -> None:
    torch.manual_seed(0)
    a, _ = load_checkpoint(short_run.checkpoint)
    b = build("cnn", **default_recipe("cnn").model_args).eval()
    x = normalise(load_mnist(val_size=0).test_images[:16])
    with torch.no_grad():
        assert torch.allclose(Ensemble([a, b]).eval()(x), (a(x) + b(x)) / 2, atol=1e-6)
    # The same model twice is the model: `python -m training evaluate a.pt a.pt` reports its accuracy.
    twice = evaluate_checkpoint([short_run.checkpoint, short_run.checkpoint])
    assert twice["accuracy"] == pytest.approx(short_run.metrics["test_accuracy"], abs=1e-4)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    first, second = _new_run_dir(tmp_path, "cnn-20261204-120148"), _new_run_dir(tmp_path, "cnn-20261204-120148")
    assert first.name == "cnn-20261204-120148" and second.name == "cnn-20261204-120148-2"
    assert first.is_dir() and second.is_dir()
