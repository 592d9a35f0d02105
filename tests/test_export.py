"""Export of a freshly trained tiny model: metadata, verification, ONNX-only evaluation, models.json; exported/
written only with --replace and never by a worse model; int8 variants that keep the probability contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.calibrate import ece, softmax
from training.data import load_arrays, load_mnist, normalise
from training.evaluate import evaluate_onnx, load_checkpoint, onnx_outputs
from training.export import REQUIRED_METADATA, SHIPPED_DIR, ExportError, export, file_sha256, verify
from training.models import build
from training.train import default_recipe, train


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    recipe = default_recipe("cnn-tiny", epochs=1, train_subset=5000)
    data = load_mnist(val_size=recipe.val_size, seed=recipe.seed, train_subset=recipe.train_subset)
    run = train(recipe, torch.device("cpu"), data, runs_dir=tmp_path_factory.mktemp("runs"), command="pytest")
    out = tmp_path_factory.mktemp("exported")
    report = export(run.checkpoint, out, name="mnist-test-tiny")
    return run, report, out


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_graph_signature_is_the_contract(exported) -> None:
    _, report, _ = exported
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)  # symbolic batch dimension
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    digits = load_arrays()["t10k-images-idx3-ubyte"][:5, None].astype(np.float32) / 255.0
    probabilities, logits = session.run(None, {"image": digits})
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # The graph normalises and applies softmax itself: probabilities are softmax(logits).
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(1, keepdims=True), atol=1e-6)
    assert onnx.load(str(report.path)).opset_import[0].version == 18


def test_metadata_is_complete_and_true(exported) -> None:
    run, report, _ = exported
    meta = metadata(report.path)
    assert set(REQUIRED_METADATA) <= set(meta)
    assert meta["model_name"] == "mnist-test-tiny" and meta["architecture"] == "cnn-tiny"
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert json.loads(meta["input_shape"]) == [-1, 1, 28, 28] and json.loads(meta["input_range"]) == [
        0.0,
        1.0,
    ]
    assert meta["input_polarity"] == "white-on-black"
    assert json.loads(meta["normalization"]) == {"mean": 0.1307, "std": 0.3081, "applied_in_graph": True}
    assert int(meta["parameters"]) == report.parameters
    assert meta["run_id"] == run.metrics["run_id"] and json.loads(meta["recipe"])["model"] == "cnn-tiny"
    assert float(meta["test_accuracy"]) == pytest.approx(report.onnx_test_accuracy, abs=5e-5)
    calibration = torch.load(run.checkpoint, weights_only=True)["calibration"]
    assert float(meta["temperature"]) == pytest.approx(calibration["temperature"], rel=1e-5)
    assert meta["ood_score"] == calibration["ood_score"] == "max_probability"
    assert float(meta["ood_threshold"]) == pytest.approx(calibration["ood_threshold"], rel=1e-5)
    assert float(meta["uncertain_threshold"]) == 0.9


def test_temperature_is_in_the_graph_and_the_metadata_measures_it(exported) -> None:
    run, report, _ = exported
    meta = metadata(report.path)
    temperature = float(meta["temperature"])
    model, _ = load_checkpoint(run.checkpoint)
    arrays = load_arrays()
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    probabilities, logits = onnx_outputs(session, images)
    with torch.no_grad():
        raw = model(normalise(torch.from_numpy(images.copy()))).numpy()
    # The graph's logits are the model's divided by the temperature; its probabilities are their softmax.
    np.testing.assert_allclose(logits, raw / temperature, rtol=1e-4, atol=1e-4)
    # The metadata's ECE is the one these outputs have, before and after the temperature.
    assert float(meta["test_ece"]) == pytest.approx(ece(probabilities, labels), abs=1e-4)
    assert float(meta["test_ece_uncalibrated"]) == pytest.approx(ece(softmax(raw), labels), abs=1e-4)
    held_out = json.loads(meta["ood_held_out"])
    assert held_out["digits"] == 10000 and held_out["non_digits"] == 4500 and 0 <= held_out["auroc"] <= 1


def test_verification_figures(exported) -> None:
    run, report, _ = exported
    assert set(report.max_abs_diff) == {1, 7, 256}
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert report.onnx_test_accuracy == report.torch_test_accuracy
    assert report.torch_test_accuracy == pytest.approx(run.metrics["test_accuracy"], abs=1e-4)


def test_verification_rejects_a_graph_that_does_not_match_the_model(exported) -> None:
    run, report, _ = exported
    arrays = load_arrays()
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    model, checkpoint = load_checkpoint(run.checkpoint)
    temperature = checkpoint["calibration"]["temperature"]
    verify(report.path, model, images, labels, temperature)  # the real pair passes
    with pytest.raises(ExportError, match="differs from torch"):  # the graph holds the temperature
        verify(report.path, model, images, labels, temperature * 2)
    torch.manual_seed(1)
    with pytest.raises(ExportError, match="differs from torch"):
        verify(report.path, build("cnn-tiny").eval(), images, labels, temperature)


def test_onnx_only_evaluation_matches(exported) -> None:
    _, report, _ = exported
    assert evaluate_onnx(report.path)["accuracy"] == report.onnx_test_accuracy


def test_models_json_lists_the_file(exported) -> None:
    run, report, out = exported
    index = json.loads((out / "models.json").read_text())["models"]
    entry = index["mnist-test-tiny"]
    assert entry["file"] == report.path.name and entry["sha256"] == file_sha256(report.path)
    assert entry["test_accuracy"] == pytest.approx(report.onnx_test_accuracy, abs=5e-5)
    assert entry["opset"] == 18 and entry["parameters"] == report.parameters
    assert entry["run_id"] == run.metrics["run_id"] and "python -m training export" in entry["export_command"]
    meta = metadata(report.path)
    for key in ("temperature", "test_ece", "test_ece_uncalibrated", "ood_threshold", "uncertain_threshold"):
        assert entry[key] == pytest.approx(float(meta[key])), key
    assert entry["ood_score"] == meta["ood_score"] and entry["ood_held_out"] == json.loads(meta["ood_held_out"])


def test_the_shipped_folder_is_written_only_with_replace(exported) -> None:
    run, _, _ = exported
    before = {p.name: file_sha256(p) for p in SHIPPED_DIR.iterdir() if p.is_file()}
    with pytest.raises(ExportError, match="holds the shipped models"):
        export(run.checkpoint, SHIPPED_DIR, name="mnist-cnn")
    # The command line's default is the scratch folder, never exported/.
    result = subprocess.run(
        [sys.executable, "-m", "training", "export", str(run.checkpoint), "--out", str(SHIPPED_DIR)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "holds the shipped models" in result.stderr, result.stderr
    assert {p.name: file_sha256(p) for p in SHIPPED_DIR.iterdir() if p.is_file()} == before


def test_replace_refuses_a_less_accurate_model(exported, tmp_path: Path) -> None:
    """A quick run (1 epoch on 5,000 images) does not replace the shipped CNN: a refusal with both figures."""
    run, report, _ = exported
    for name in ("mnist-cnn.onnx", "models.json"):
        shutil.copy(SHIPPED_DIR / name, tmp_path / name)
    before = {p.name: file_sha256(p) for p in tmp_path.iterdir()}
    command = [sys.executable, "-m", "training", "export", str(run.checkpoint), "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, "--name", "mnist-cnn", "--replace"], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    shipped = json.loads((SHIPPED_DIR / "models.json").read_text())["models"]["mnist-cnn"]["test_accuracy"]
    assert f"{100 * shipped:.2f}%" in result.stderr and f"{100 * report.onnx_test_accuracy:.2f}%" in result.stderr
    assert "not replacing" in result.stderr
    assert {p.name: file_sha256(p) for p in tmp_path.iterdir()} == before


def test_replace_takes_a_model_as_accurate_and_int8_keeps_the_contract(exported, tmp_path: Path) -> None:
    run, report, _ = exported
    shutil.copy(report.path, tmp_path / report.path.name)
    again = export(run.checkpoint, tmp_path, name="mnist-test-tiny", int8=True, replace=True)  # same accuracy: taken
    assert again.onnx_test_accuracy == report.onnx_test_accuracy
    assert file_sha256(again.path) != file_sha256(report.path)  # rewritten (its export time differs)
    # Offered or not, the int8 variant's probabilities sum to 1 (its softmax runs in float).
    assert again.int8["max_probability_sum_error"] <= 1e-6, again.int8
    if again.int8["kept"]:
        session = ort.InferenceSession(again.int8["file"], providers=["CPUExecutionProvider"])
        digits = load_arrays()["t10k-images-idx3-ubyte"][:256, None].astype(np.float32) / 255.0
        np.testing.assert_allclose(session.run(["probabilities"], {"image": digits})[0].sum(1), 1.0, atol=1e-6)
