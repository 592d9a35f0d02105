"""The models the service ships with: listed, intact, complete metadata, and as accurate as claimed."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from service.runtime import REQUIRED_KEYS as SERVICE_REQUIRED
from training.evaluate import evaluate_onnx
from training.export import REQUIRED_METADATA, file_sha256

EXPORTED = Path(__file__).resolve().parent.parent / "exported"
INDEX = json.loads((EXPORTED / "models.json").read_text())["models"]
TARGETS = {"mnist-cnn": 0.995, "mnist-mlp": 0.985}


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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INDEX))
def test_claimed_accuracy_is_measured_accuracy(name: str) -> None:
    entry = INDEX[name]
    measured = evaluate_onnx(EXPORTED / entry["file"])["accuracy"]
    assert measured == pytest.approx(entry["test_accuracy"], abs=5e-5)
    assert measured >= TARGETS.get(name.removesuffix("-int8"), 0.0) - (0.001 if name.endswith("-int8") else 0)
