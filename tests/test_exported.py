"""The models the service ships with: listed, intact, complete metadata, and as accurate as claimed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from service.inference.runtime import REQUIRED_KEYS as SERVICE_REQUIRED
from training.evaluate import evaluate_onnx
from training.export import REQUIRED_METADATA, file_sha256

EXPORTED = Path(__file__).resolve().parent.parent / "exported"
INDEX = json.loads((EXPORTED / "models.json").read_text())["models"]
# Issue 11: every shipped float model calibrated to this test-set ECE (15 bins); "not a digit" separating the
# held-out non-digits from the test digits with this AUROC, flagging at most this share of the digits.
MAX_ECE = 0.015
MIN_AUROC = 0.95
MAX_DIGITS_FLAGGED = 0.01


@dataclass(frozen=True)
class Figures:
    accuracy: float  # on the 10,000 test digits
    auroc: float  # "not a digit": held-out non-digits against the test digits
    non_digits_flagged: float  # share of the held-out non-digits answered not_a_digit


# The figures recorded when the shipped files were exported (models.json of 2026-12-01/02/04; README, "Shipped
# models"), written here as constants: the floors below come from them, so a re-export that measures less fails even
# when models.json and the file's metadata say so. Raise them with a better model; never lower them to fit one.
RECORDED = {
    "mnist-cnn": Figures(accuracy=0.9958, auroc=0.9994, non_digits_flagged=0.9689),  # 2026-12-04
    "mnist-mlp": Figures(accuracy=0.9867, auroc=0.9950, non_digits_flagged=0.7582),
    "mnist-cnn-tiny": Figures(accuracy=0.9417, auroc=0.9462, non_digits_flagged=0.3242),
}
# The margins: 20 of the 10,000 test digits, half a point of AUROC, 3 points of the 4,500 held-out non-digits.
MARGIN = Figures(accuracy=0.002, auroc=0.005, non_digits_flagged=0.03)
# Accuracy floors set before these margins, kept (never lowered): the CNN's 99.50% of issue 11's retrain (whose goal,
# 99.7%, is still open), the MLP's 98.5%.
EARLIER_ACCURACY_FLOORS = {"mnist-cnn": 0.995, "mnist-mlp": 0.985}
# Issue 27: held-out hand-drawn shapes (training/shapes.py) a user sees as not a confident digit (not_a_digit or
# uncertain), for the models exported since they were measured (2026-12-04: the CNN; the others predate them).
MIN_DRAWN_SHAPES_NOT_OK = {"mnist-cnn": 0.9}
INT8_ACCURACY_LOSS = 0.001  # what an int8 variant may lose against its float model (the exporter's own rule)


def floors(name: str) -> Figures:
    """The floors of shipped model `name` (an int8 variant: its float model's, less INT8_ACCURACY_LOSS); the issue's
    AUROC goal for the models that met it, the recorded figure less its margin for the others, whichever is higher."""
    base = name.removesuffix("-int8")
    recorded = RECORDED[base]
    accuracy = max(EARLIER_ACCURACY_FLOORS.get(base, 0.0), recorded.accuracy - MARGIN.accuracy)
    return Figures(
        accuracy=accuracy - (INT8_ACCURACY_LOSS if name.endswith("-int8") else 0.0),
        auroc=max(MIN_AUROC if recorded.auroc >= MIN_AUROC else 0.0, recorded.auroc - MARGIN.auroc),
        non_digits_flagged=recorded.non_digits_flagged - MARGIN.non_digits_flagged,
    )


def test_the_exporter_writes_every_key_the_service_requires() -> None:
    assert set(SERVICE_REQUIRED) <= set(REQUIRED_METADATA)


def test_the_shipped_models_are_listed() -> None:
    assert set(RECORDED) <= set(INDEX)
    assert {name.removesuffix("-int8") for name in INDEX} <= set(RECORDED), "every shipped model has floors"
    listed = {entry["file"] for entry in INDEX.values()}
    assert listed == {p.name for p in EXPORTED.glob("*.onnx")}, "every shipped file is listed, and only those"


@pytest.mark.parametrize("name", sorted(INDEX))
def test_file_matches_its_entry(name: str) -> None:
    entry = INDEX[name]
    path = EXPORTED / entry["file"]
    assert file_sha256(path) == entry["sha256"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert not set(REQUIRED_METADATA) - set(meta), f"missing metadata: {set(REQUIRED_METADATA) - set(meta)}"
    assert meta["model_name"] == name
    assert int(meta["parameters"]) == entry["parameters"] and int(meta["opset"]) == entry["opset"]
    assert float(meta["test_accuracy"]) == pytest.approx(entry["test_accuracy"])
    # Where it came from: the run (also in the file's metadata) and the commands that made it.
    assert entry["run_id"] == meta["run_id"]
    assert entry["train_command"].startswith("python -m training train --model " + meta["architecture"])
    assert entry["export_command"].startswith("python -m training export ")
    # Calibration and the status thresholds: listed as the file carries them.
    for key in ("temperature", "test_ece", "test_ece_uncalibrated", "ood_threshold", "uncertain_threshold"):
        assert entry[key] == pytest.approx(float(meta[key])), key
    assert entry["ood_score"] == meta["ood_score"] and entry["ood_held_out"] == json.loads(meta["ood_held_out"])
    if not name.endswith("-int8"):
        assert entry["test_ece"] <= MAX_ECE, f"{name}: test ECE {entry['test_ece']} > {MAX_ECE}"


@pytest.mark.parametrize("name", sorted(INDEX))
def test_the_recorded_figures_meet_the_floors(name: str) -> None:
    """What models.json claims for each shipped file, against its floors (fast: the slow tests below re-measure the
    claims)."""
    entry, floor = INDEX[name], floors(name)
    assert entry["test_accuracy"] >= floor.accuracy, f"{name}: {entry['test_accuracy']} < {floor.accuracy}"
    ood = entry["ood_held_out"]
    assert ood["auroc"] >= floor.auroc, f"{name}: AUROC {ood['auroc']} < {floor.auroc}"
    assert ood["non_digits_flagged"] >= floor.non_digits_flagged, name
    assert ood["digits_flagged"] <= MAX_DIGITS_FLAGGED, name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INDEX))
def test_claimed_accuracy_is_measured_accuracy(name: str) -> None:
    entry = INDEX[name]
    measured = evaluate_onnx(EXPORTED / entry["file"])["accuracy"]
    assert measured == pytest.approx(entry["test_accuracy"], abs=5e-5)
    assert measured >= floors(name).accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INDEX))
def test_claimed_calibration_and_not_a_digit_are_measured(name: str) -> None:
    entry = INDEX[name]
    result = evaluate_onnx(EXPORTED / entry["file"], ood=True)
    assert result["ece"] == pytest.approx(entry["test_ece"], abs=1e-4)
    assert result["ece_uncalibrated"] == pytest.approx(entry["test_ece_uncalibrated"], abs=1e-4)
    ood, claimed = result["ood"], entry["ood_held_out"]
    for key in ("auroc", "non_digits_flagged", "digits_flagged"):
        assert ood[key] == pytest.approx(claimed[key], abs=1e-4), key
    if not name.endswith("-int8"):
        assert result["ece"] <= MAX_ECE
    floor = floors(name)
    assert ood["auroc"] >= floor.auroc and ood["non_digits_flagged"] >= floor.non_digits_flagged, ood
    assert ood["digits_flagged"] <= MAX_DIGITS_FLAGGED, ood


def test_the_default_model_does_not_read_drawn_shapes_as_digits() -> None:
    """What models.json claims for the held-out drawn shapes, against issue 27's floor (re-measured below)."""
    for name, floor in MIN_DRAWN_SHAPES_NOT_OK.items():
        claimed = INDEX[name]["drawn_shapes_held_out"]
        assert claimed["not_ok"] >= floor, f"{name}: {claimed}"


@pytest.mark.slow
def test_claimed_drawn_shapes_figures_are_measured() -> None:
    for name, floor in MIN_DRAWN_SHAPES_NOT_OK.items():
        measured = evaluate_onnx(EXPORTED / INDEX[name]["file"], ood=True)["ood"]["drawn_shapes"]
        claimed = INDEX[name]["drawn_shapes_held_out"]
        assert measured["not_ok"] == pytest.approx(claimed["not_ok"], abs=1e-4)
        assert measured["flagged"] == pytest.approx(claimed["flagged"], abs=1e-4)
        assert measured["not_ok"] >= floor
